// Asks the `echo` cluster's gRPC service (test.Echo/Unary, the request path as the message,
// `x-asked-for` metadata, 1 s timeout) before letting a request go on: the answer goes upstream
// in `x-grpc-answer` (with the server's `x-server` initial metadata in `x-grpc-server`); a
// failed call is a 503 naming the gRPC status and message.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  continue_request,
  send_local_response,
  proxy_set_effective_context,
  stream_context,
} from "@solo-io/proxy-runtime";
import {
  get_buffer_bytes,
  get_header_map_value,
  get_status,
  BufferTypeValues,
  HeaderMapTypeValues,
} from "@solo-io/proxy-runtime/runtime";

// This SDK version declares proxy_grpc_call as ABI 0.1.0 had it (no initial metadata) and leaves
// its grpc_call commented out: the ABI 0.2.1 function is imported directly.
// @ts-ignore: decorator
@external("env", "proxy_grpc_call")
declare function proxy_grpc_call(
  service: usize, service_size: usize, service_name: usize, service_name_size: usize,
  method: usize, method_size: usize, metadata: usize, metadata_size: usize,
  message: usize, message_size: usize, timeout_ms: u32, token: usize): u32;

// One metadata pair in the ABI's serialization: count, sizes, then each string and a NUL.
function one_pair(name: ArrayBuffer, value: ArrayBuffer): ArrayBuffer {
  const out = new ArrayBuffer(12 + name.byteLength + value.byteLength + 2);
  const base = changetype<usize>(out);
  store<u32>(base, 1);
  store<u32>(base + 4, name.byteLength);
  store<u32>(base + 8, value.byteLength);
  memory.copy(base + 12, changetype<usize>(name), name.byteLength);
  store<u8>(base + 12 + name.byteLength, 0);
  memory.copy(base + 13 + name.byteLength, changetype<usize>(value), value.byteLength);
  store<u8>(base + 13 + name.byteLength + value.byteLength, 0);
  return out;
}

class Ask {
  context_id: u32;
  server: string = "";
  answer: string = "";
  constructor(context_id: u32) {
    this.context_id = context_id;
  }
}

class GrpcRoot extends RootContext {
  asks: Map<u32, Ask> = new Map();
  createContext(context_id: u32): Context {
    return new GrpcAsker(context_id, this);
  }
  ask(context_id: u32, path: string): u32 {
    const cluster = String.UTF8.encode("echo");
    const service = String.UTF8.encode("test.Echo");
    const method = String.UTF8.encode("Unary");
    const metadata = one_pair(String.UTF8.encode("x-asked-for"), String.UTF8.encode(path));
    const message = String.UTF8.encode(path);
    const token = new ArrayBuffer(4);
    const result = proxy_grpc_call(
      changetype<usize>(cluster), cluster.byteLength, changetype<usize>(service), service.byteLength,
      changetype<usize>(method), method.byteLength, changetype<usize>(metadata), metadata.byteLength,
      changetype<usize>(message), message.byteLength, 1000, changetype<usize>(token));
    if (result == 0) {
      this.asks.set(load<u32>(changetype<usize>(token)), new Ask(context_id));
    }
    return result;
  }
  on_grpc_receive_initial_metadata(token: u32, headers: u32): void {
    const server = get_header_map_value(HeaderMapTypeValues.GrpcReceiveInitialMetadata, String.UTF8.encode("x-server"));
    this.asks.get(token).server = String.UTF8.decode(server);
  }
  on_grpc_receive(token: u32, response_size: u32): void {
    const answer = get_buffer_bytes(BufferTypeValues.GrpcReceiveBuffer, 0, response_size);
    this.asks.get(token).answer = String.UTF8.decode(answer);
  }
  on_grpc_close(token: u32, status_code: u32): void {
    const ask = this.asks.get(token);
    this.asks.delete(token);
    proxy_set_effective_context(ask.context_id);
    if (status_code == 0) {
      stream_context.headers.request.add("x-grpc-answer", ask.answer);
      stream_context.headers.request.add("x-grpc-server", ask.server);
      continue_request();
    } else {
      const detail = String.UTF8.decode(get_status().data);
      send_local_response(503, "grpc_call_failed",
        String.UTF8.encode("grpc status " + status_code.toString() + ": " + detail + "\n"),
        [], GrpcStatusValues.InvalidCode);
    }
  }
}

class GrpcAsker extends Context {
  root: GrpcRoot;
  constructor(context_id: u32, root_context: GrpcRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (this.root.ask(this.context_id, stream_context.headers.request.get(":path")) != 0) {
      send_local_response(503, "grpc_unreachable", String.UTF8.encode("no echo cluster\n"),
        [], GrpcStatusValues.InvalidCode);
    }
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => {
  return new GrpcRoot(context_id);
}, "grpc_call");
