// Answers requests without an `x-token` header itself (403, a body and a header); a gRPC request gets
// grpc-status 7 (PERMISSION_DENIED) instead.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  HeaderPair,
  Headers,
  send_local_response,
  stream_context,
} from "@solo-io/proxy-runtime";

class DenyRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Deny(context_id, this);
  }
}

class Deny extends Context {
  constructor(context_id: u32, root_context: DenyRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get("x-token") != "") {
      return FilterHeadersStatusValues.Continue;
    }
    const grpc = stream_context.headers.request.get("content-type").startsWith("application/grpc");
    const headers: Headers = [];
    headers.push(new HeaderPair(String.UTF8.encode("x-denied-by"), String.UTF8.encode("as-sdk")));
    send_local_response(
      grpc ? 200 : 403,
      "missing_token",
      String.UTF8.encode("no token\n"),
      headers,
      grpc ? GrpcStatusValues.PermissionDenied : GrpcStatusValues.InvalidCode,
    );
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => {
  return new DenyRoot(context_id);
}, "deny");
