// A network (TCP) filter written against the SDK: the downstream's bytes are upper-cased on their
// way upstream, the upstream's are counted, and each side's close is logged with the totals.
// This SDK version's runtime has the network callbacks (Context.onNewConnection,
// onDownstreamData, ...) but exports none of them, so the module exports them as Envoy's host
// calls them; its proxy_set_buffer_bytes is misdeclared, so the ABI's is imported directly.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterStatusValues,
  log,
  LogLevelValues,
} from "@solo-io/proxy-runtime";
import {
  BufferTypeValues,
  PeerTypeValues,
  get_buffer_bytes,
  getContext,
} from "@solo-io/proxy-runtime/runtime";

// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: i32, start: u32, length: u32, data: usize, size: usize): u32;

class TcpRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Upper(context_id, this);
  }
}

class Upper extends Context {
  up: u64 = 0;
  down: u64 = 0;
  constructor(context_id: u32, root_context: TcpRoot) {
    super(context_id, root_context);
  }
  onNewConnection(): FilterStatusValues {
    log(LogLevelValues.warn, "tcp: new connection");
    return FilterStatusValues.Continue;
  }
  onDownstreamData(size: usize, end: bool): FilterStatusValues {
    if (size == 0) return FilterStatusValues.Continue;
    const data = Uint8Array.wrap(get_buffer_bytes(BufferTypeValues.NetworkDownstreamData, 0, size as u32));
    for (let i = 0; i < data.length; i++) {
      const c = data[i];
      if (c >= 97 && c <= 122) data[i] = c - 32;
    }
    proxy_set_buffer_bytes(BufferTypeValues.NetworkDownstreamData, 0, size as u32, data.dataStart, data.length);
    this.up += size;
    return FilterStatusValues.Continue;
  }
  onUpstreamData(size: usize, end: bool): FilterStatusValues {
    this.down += size;
    return FilterStatusValues.Continue;
  }
  onDownstreamConnectionClose(t: PeerTypeValues): void {
    log(LogLevelValues.warn, "tcp: downstream closed, peer " + (t as u32).toString());
  }
  onUpstreamConnectionClose(t: PeerTypeValues): void {
    log(LogLevelValues.warn, "tcp: upstream closed, peer " + (t as u32).toString() +
      ", up " + this.up.toString() + " down " + this.down.toString());
  }
}

// The runtime declares these callbacks on its base context class, and this compiler version
// does not dispatch them to a subclass's overrides through it: each call names the class.
function connection(context_id: u32): Upper {
  return getContext(context_id) as Upper;
}

export function proxy_on_new_connection(context_id: u32): u32 {
  return connection(context_id).onNewConnection() as u32;
}
export function proxy_on_downstream_data(context_id: u32, size: u32, end_of_stream: u32): u32 {
  return connection(context_id).onDownstreamData(size, end_of_stream != 0) as u32;
}
export function proxy_on_upstream_data(context_id: u32, size: u32, end_of_stream: u32): u32 {
  return connection(context_id).onUpstreamData(size, end_of_stream != 0) as u32;
}
export function proxy_on_downstream_connection_close(context_id: u32, peer_type: u32): void {
  connection(context_id).onDownstreamConnectionClose(peer_type as PeerTypeValues);
}
export function proxy_on_upstream_connection_close(context_id: u32, peer_type: u32): void {
  connection(context_id).onUpstreamConnectionClose(peer_type as PeerTypeValues);
}

registerRootContext((context_id: u32) => {
  return new TcpRoot(context_id);
}, "tcp");
