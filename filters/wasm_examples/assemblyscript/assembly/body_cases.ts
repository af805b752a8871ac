// Acts on each body at its end as the request's `x-body-case` header says, heads untouched:
// `shout` upper-cases it (same length, so the head's framing still holds), `reply` answers 418
// from the body callback, `hold` keeps it (StopIterationAndBuffer, never resumed). Anything else
// passes it on. The cases a proxy must hand on when a body callback does more than Continue.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterDataStatusValues,
  GrpcStatusValues,
  Headers,
  send_local_response,
  stream_context,
} from "@solo-io/proxy-runtime";
import { BufferTypeValues, get_buffer_bytes } from "@solo-io/proxy-runtime/runtime";

// This SDK version declares its setter under the getter's name (proxy_get_buffer_status), so the
// ABI's proxy_set_buffer_bytes is imported directly.
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: i32, start: u32, length: u32, data: usize, size: usize): u32;

function shout(typ: BufferTypeValues, length: u32): void {
  const bytes = Uint8Array.wrap(get_buffer_bytes(typ, 0, length));
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i];
    if (c >= 97 && c <= 122) bytes[i] = c - 32;
  }
  proxy_set_buffer_bytes(typ, 0, length, changetype<usize>(bytes.buffer), bytes.byteLength);
}

function act(typ: BufferTypeValues, length: usize, end_of_stream: bool): FilterDataStatusValues {
  const body_case = stream_context.headers.request.get("x-body-case");
  if (body_case == "hold") {
    return FilterDataStatusValues.StopIterationAndBuffer;
  }
  if (!end_of_stream) {
    return FilterDataStatusValues.StopIterationAndBuffer; // act on the whole body
  }
  if (body_case == "shout") {
    shout(typ, length as u32);
  } else if (body_case == "reply") {
    const headers: Headers = [];
    send_local_response(418, "body_case", String.UTF8.encode("answered from the body\n"), headers,
                        GrpcStatusValues.InvalidCode);
    return FilterDataStatusValues.StopIterationNoBuffer;
  }
  return FilterDataStatusValues.Continue;
}

class BodyCasesRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new BodyCases(context_id, this);
  }
}

class BodyCases extends Context {
  constructor(context_id: u32, root_context: BodyCasesRoot) {
    super(context_id, root_context);
  }
  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    return act(BufferTypeValues.HttpRequestBody, body_buffer_length, end_of_stream);
  }
  onResponseBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    return act(BufferTypeValues.HttpResponseBody, body_buffer_length, end_of_stream);
  }
}

registerRootContext((context_id: u32) => {
  return new BodyCasesRoot(context_id);
}, "body_cases");
