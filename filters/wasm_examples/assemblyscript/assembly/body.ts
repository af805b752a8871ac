// Rewrites bodies the way the SDKs' http_body examples do: the request body is buffered to its
// end (StopIterationAndBuffer), then every "secret" in it becomes "[redacted]"; the response body
// streams through, with a line appended at its end. Both drop content-length in the headers
// callback first, since the body's length changes after the headers have gone.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  FilterDataStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import { BufferTypeValues, get_buffer_bytes } from "@solo-io/proxy-runtime/runtime";

// This SDK version declares its setter under the getter's name (proxy_get_buffer_status), so the
// ABI's proxy_set_buffer_bytes is imported directly.
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: i32, start: u32, length: u32, data: usize, size: usize): u32;

function set_body(typ: BufferTypeValues, start: u32, length: u32, text: string): u32 {
  const bytes = String.UTF8.encode(text);
  return proxy_set_buffer_bytes(typ, start, length, changetype<usize>(bytes), bytes.byteLength);
}

class BodyRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Body(context_id, this);
  }
}

class Body extends Context {
  constructor(context_id: u32, root_context: BodyRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.remove("content-length");
    return FilterHeadersStatusValues.Continue;
  }
  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (!end_of_stream) {
      return FilterDataStatusValues.StopIterationAndBuffer;
    }
    const length = body_buffer_length as u32;
    const body = String.UTF8.decode(get_buffer_bytes(BufferTypeValues.HttpRequestBody, 0, length));
    set_body(BufferTypeValues.HttpRequestBody, 0, length, body.split("secret").join("[redacted]"));
    return FilterDataStatusValues.Continue;
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.remove("content-length");
    return FilterHeadersStatusValues.Continue;
  }
  onResponseBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (end_of_stream) {
      set_body(BufferTypeValues.HttpResponseBody, body_buffer_length as u32, 0, "\n-- seen by as-sdk\n");
    }
    return FilterDataStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new BodyRoot(context_id);
}, "body");
