// Keeps a hit count per path in the host's shared data (compare-and-swap on every update) and
// reports it in `x-hits`.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import * as imports from "@solo-io/proxy-runtime/imports";

class HitsRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Hits(context_id, this);
  }
}

// u32 out-parameters for proxy_get_shared_data: value pointer, value size, cas.
const out = new ArrayBuffer(12);

function bump(key: string): u32 {
  const name = String.UTF8.encode(key);
  const slots = changetype<usize>(out);
  for (let attempt = 0; attempt < 8; attempt++) {
    let count: u32 = 0;
    let cas: u32 = 0;
    if (imports.proxy_get_shared_data(changetype<usize>(name), name.byteLength, slots, slots + 4, slots + 8) == 0) {
      count = load<u32>(load<usize>(slots));
      cas = load<u32>(slots + 8);
    }
    const value = new ArrayBuffer(4);
    store<u32>(changetype<usize>(value), count + 1);
    if (imports.proxy_set_shared_data(changetype<usize>(name), name.byteLength, changetype<usize>(value), 4, cas) == 0) {
      return count + 1;
    }
  }
  return 0;
}

class Hits extends Context {
  constructor(context_id: u32, root_context: HitsRoot) {
    super(context_id, root_context);
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const hits = bump("hits:" + stream_context.headers.request.get(":path"));
    stream_context.headers.response.add("x-hits", hits.toString());
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new HitsRoot(context_id);
}, "hits");
