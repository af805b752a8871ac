// Reads and edits trailers: the request's trailers get `x-checked` (the value of the client's
// `x-checksum` trailer, or "none"), the response's get `x-as-trailer` and lose `x-drop-me`.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterTrailersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";

class TrailersRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Trailers(context_id, this);
  }
}

class Trailers extends Context {
  constructor(context_id: u32, root_context: TrailersRoot) {
    super(context_id, root_context);
  }
  onRequestTrailers(a: u32): FilterTrailersStatusValues {
    let checksum = stream_context.trailers.request.get("x-checksum");
    if (checksum.length == 0) {
      checksum = "none";
    }
    stream_context.trailers.request.add("x-checked", checksum);
    return FilterTrailersStatusValues.Continue;
  }
  onResponseTrailers(a: u32): FilterTrailersStatusValues {
    stream_context.trailers.response.add("x-as-trailer", "count=" + a.toString());
    stream_context.trailers.response.remove("x-drop-me");
    return FilterTrailersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new TrailersRoot(context_id);
}, "trailers");
