// Asks the `auth` cluster (GET /check, 1 s timeout) before letting a request go on: a 200 lets it
// through with the answer's body in `x-auth-answer`; anything else, or no answer, is a 403.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  BaseContext,
  registerRootContext,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  HeaderPair,
  Headers,
  continue_request,
  send_local_response,
  stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class AuthRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Auth(context_id, this);
  }
}

function pair(name: string, value: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(name), String.UTF8.encode(value));
}

class Auth extends Context {
  constructor(context_id: u32, root_context: AuthRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const headers: Headers = [];
    headers.push(pair(":method", "GET"));
    headers.push(pair(":path", "/check"));
    headers.push(pair(":authority", "auth"));
    headers.push(pair("x-asked-for", stream_context.headers.request.get(":path")));
    const result = this.root_context.httpCall(
      "auth", headers, new ArrayBuffer(0), [], 1000, this,
      (origin: BaseContext, nheaders: u32, body_size: usize, ntrailers: u32): void => {
        const status = stream_context.headers.http_callback.get(":status");
        if (status == "200") {
          const body = get_buffer_bytes(BufferTypeValues.HttpCallResponseBody, 0, body_size as u32);
          stream_context.headers.request.add("x-auth-answer", String.UTF8.decode(body));
          continue_request();
        } else {
          send_local_response(403, "auth_denied", String.UTF8.encode("auth said " + status + "\n"),
            [], GrpcStatusValues.InvalidCode);
        }
      });
    if (result != 0) {
      send_local_response(503, "auth_unreachable", String.UTF8.encode("no auth cluster\n"),
        [], GrpcStatusValues.InvalidCode);
    }
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => {
  return new AuthRoot(context_id);
}, "auth");
