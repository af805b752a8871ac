// Reads Envoy's attributes (proxy_get_property, paths NUL-separated as Envoy expects) and
// reports them as response headers: strings as they are, integers (8-byte little-endian) in
// decimal.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import { get_property } from "@solo-io/proxy-runtime/runtime";

function text(path: string): string {
  return String.UTF8.decode(get_property(path));
}

function number(path: string): string {
  const value = get_property(path);
  return load<i64>(changetype<usize>(value)).toString();
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
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new PropertiesRoot(context_id);
}, "properties");
