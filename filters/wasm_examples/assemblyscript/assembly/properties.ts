// Reads Envoy's attributes (proxy_get_property, paths NUL-separated as Envoy expects) and
// reports them as response headers: strings as they are, integers (8-byte little-endian) in
// decimal, protobuf messages (node, route_metadata, metadata) in hex. Once the request has
// ended, proxy_on_log logs its duration and response flags.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
  log,
  LogLevelValues,
} from "@solo-io/proxy-runtime";
import { get_property } from "@solo-io/proxy-runtime/runtime";

function text(path: string): string {
  return String.UTF8.decode(get_property(path));
}

function number(path: string): string {
  const value = get_property(path);
  return load<u64>(changetype<usize>(value)).toString();
}

function hex(path: string): string {
  const value = Uint8Array.wrap(get_property(path));
  const digits = "0123456789abcdef";
  let out = "";
  for (let i = 0; i < value.length; i++) {
    out += digits.charAt(value[i] >> 4) + digits.charAt(value[i] & 15);
  }
  return out;
}

class PropertiesRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Properties(context_id, this);
  }
}

class Properties extends Context {
  constructor(context_id: u32, root_context: PropertiesRoot) {
    super(context_id, root_context);
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const headers = stream_context.headers.response;
    headers.add("x-plugin", text("plugin_name") + "/" + text("plugin_root_id"));
    headers.add(
      "x-request",
      text("request\0method") + " " + text("request\0url_path") + " " + text("request\0query") +
        " " + text("request\0protocol") + " " + text("request\0useragent"),
    );
    headers.add("x-source", text("source\0address") + " " + number("source\0port"));
    headers.add("x-destination", text("destination\0address") + " " + number("destination\0port"));
    headers.add("x-upstream", text("upstream\0address") + " " + number("upstream\0port"));
    headers.add("x-code", number("response\0code"));
    headers.add("x-direction", number("listener_direction"));
    headers.add("x-node", text("node\0id") + " " + text("node\0cluster") + " " + text("node\0metadata\0NAME"));
    headers.add("x-node-pb", hex("node"));
    headers.add("x-connection", number("connection\0id") + " [" + text("connection\0requested_server_name") + "]");
    headers.add("x-route", text("route_name") + " " + hex("route_metadata"));
    headers.add("x-cluster", text("cluster_name") + " " + text("xds\0cluster_name"));
    headers.add("x-outcome", number("response\0flags") + " " + text("response\0code_details"));
    headers.add("x-metadata", hex("metadata"));
    return FilterHeadersStatusValues.Continue;
  }
  onLog(): void {
    log(LogLevelValues.warn, "ended: duration=" + number("request\0duration") + " flags=" +
      number("response\0flags") + " connection=" + number("connection\0id"));
  }
}

registerRootContext((context_id: u32) => {
  return new PropertiesRoot(context_id);
}, "properties");
