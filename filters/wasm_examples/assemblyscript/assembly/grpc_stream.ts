// A gRPC stream to the `echo` cluster's test.Echo/Chat, driven by requests: `/send/<word>` opens
// a stream (with `x-opened-by` initial metadata) unless one is open and sends <word>; `/close`
// half-closes it, `/cancel` cancels it; `/events` answers what the root context has heard so
// far, one line per callback. The other paths go on upstream.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  send_local_response,
  stream_context,
} from "@solo-io/proxy-runtime";
import {
  get_buffer_bytes,
  get_header_map_value,
  get_status,
  BufferTypeValues,
  HeaderMapTypeValues,
} from "@solo-io/proxy-runtime/runtime";

// This SDK version declares proxy_grpc_stream as ABI 0.1.0 had it (no initial metadata) and
// wraps none of the stream calls: the ABI 0.2.1 functions are imported directly.
// @ts-ignore: decorator
@external("env", "proxy_grpc_stream")
declare function proxy_grpc_stream(
  service: usize, service_size: usize, service_name: usize, service_name_size: usize,
  method: usize, method_size: usize, metadata: usize, metadata_size: usize, token: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_send")
declare function proxy_grpc_send(token: u32, message: usize, size: usize, end_stream: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_close")
declare function proxy_grpc_close(token: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_cancel")
declare function proxy_grpc_cancel(token: u32): u32;

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

function field(typ: HeaderMapTypeValues, name: string): string {
  return " " + name + "=" + String.UTF8.decode(get_header_map_value(typ, String.UTF8.encode(name)));
}

let events: Array<string> = [];
let token: u32 = 0; // the last stream opened (kept after it ends: /close and /cancel use it)
let open = false;

class StreamRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new StreamDriver(context_id, this);
  }
  on_grpc_receive_initial_metadata(t: u32, headers: u32): void {
    events.push("initial " + t.toString() + field(HeaderMapTypeValues.GrpcReceiveInitialMetadata, "x-server"));
  }
  on_grpc_receive(t: u32, response_size: u32): void {
    const message = get_buffer_bytes(BufferTypeValues.GrpcReceiveBuffer, 0, response_size);
    events.push("message " + t.toString() + " " + String.UTF8.decode(message));
  }
  on_grpc_close(t: u32, status_code: u32): void {
    const detail = String.UTF8.decode(get_status().data);
    events.push("close " + t.toString() + " " + status_code.toString() + " " + detail);
    if (t == token) open = false;
  }
}

// The SDK exports this callback as proxy_on_grpc_trailing_metadata, a name no host calls.
export function proxy_on_grpc_receive_trailing_metadata(context_id: u32, t: u32, trailers: u32): void {
  events.push("trailing " + t.toString() + field(HeaderMapTypeValues.GrpcReceiveTrailingMetadata, "x-count"));
}

function reply(text: string): FilterHeadersStatusValues {
  send_local_response(200, "grpc_stream", String.UTF8.encode(text + "\n"), [], GrpcStatusValues.InvalidCode);
  return FilterHeadersStatusValues.StopIteration;
}

class StreamDriver extends Context {
  constructor(context_id: u32, root_context: StreamRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.startsWith("/send/")) {
      if (!open) {
        const cluster = String.UTF8.encode("echo");
        const service = String.UTF8.encode("test.Echo");
        const method = String.UTF8.encode("Chat");
        const metadata = one_pair(String.UTF8.encode("x-opened-by"), String.UTF8.encode("wasm"));
        const out = new ArrayBuffer(4);
        const result = proxy_grpc_stream(
          changetype<usize>(cluster), cluster.byteLength, changetype<usize>(service), service.byteLength,
          changetype<usize>(method), method.byteLength, changetype<usize>(metadata), metadata.byteLength,
          changetype<usize>(out));
        if (result != 0) return reply("stream refused " + result.toString());
        token = load<u32>(changetype<usize>(out));
        open = true;
      }
      const word = String.UTF8.encode(path.substring(6));
      const sent = proxy_grpc_send(token, changetype<usize>(word), word.byteLength, 0);
      return reply("sent " + token.toString() + " " + sent.toString());
    }
    if (path == "/close") return reply("close " + proxy_grpc_close(token).toString());
    if (path == "/cancel") {
      const result = proxy_grpc_cancel(token);
      open = false;
      return reply("cancel " + result.toString());
    }
    if (path == "/events") return reply(events.join("\n"));
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new StreamRoot(context_id);
}, "grpc_stream");
