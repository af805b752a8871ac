// Counts requests in a counter and a gauge, and records each request path's length in a
// histogram; each response carries the counter's value as the host reports it (proxy_get_metric).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  Counter,
  Gauge,
  Histogram,
  stream_context,
} from "@solo-io/proxy-runtime";
import * as imports from "@solo-io/proxy-runtime/imports";

class MetricsRoot extends RootContext {
  requests: Counter = new Counter("as_requests_total");
  in_flight: Gauge = new Gauge("as_in_flight");
  path_length: Histogram = new Histogram("as_path_length");
  createContext(context_id: u32): Context {
    return new Metrics(context_id, this);
  }
}

class Metrics extends Context {
  root: MetricsRoot;
  constructor(context_id: u32, root_context: MetricsRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.root.requests.increment(1);
    this.root.in_flight.increment(1);
    const path = stream_context.headers.request.get(":path");
    this.root.path_length.record(this.root.path_length.metric_id, path.length as u64);
    return FilterHeadersStatusValues.Continue;
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const value = new ArrayBuffer(8);
    imports.proxy_get_metric(this.root.requests.metric_id, changetype<usize>(value));
    stream_context.headers.response.add("x-requests", load<u64>(changetype<usize>(value)).toString());
    this.root.in_flight.increment(-1);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new MetricsRoot(context_id);
}, "metrics");
