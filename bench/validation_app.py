"""A tiny service for validating predictions: answer after calling downstream services, over HTTP/1.1 or gRPC.

`--protocol http` serves POST requests (HTTP/1.1, kept alive) and calls its
downstream services the same way; `--protocol grpc` serves the unary method
`/bench.Echo/Unary` (grpcio) and calls its downstream services with it.
`--call ADDR` (repeatable) names downstream services; `--parallel` calls them
at once, otherwise one after another. Each request's body is forwarded as the
body of every downstream call, and echoed back once they all answered.
`--work-us` spins the CPU that long per request (the service's own work).
With `--trace FILE` the service records OpenTelemetry spans (a server span
per request, a client span per downstream call, W3C `traceparent`
propagated in HTTP headers or gRPC metadata) and appends them to FILE as OTLP
JSON, one export per line, when it stops (SIGTERM): the SDK's batch processor
holds them until then, so exporting never runs on, or beside, the requests
the spans time (a span ended before the service answers would otherwise make
its caller wait for the export, and its trace report that wait as the hop's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator

from pyproxy.bench.driver import GRPC_METHOD
from pyproxy.bench.echo_server import dechunk, spin

from pyproxy.eventloop import new_event_loop

GRPC_SERVICE, GRPC_NAME = GRPC_METHOD.strip("/").split("/")


class Spans:
    """The app's OpenTelemetry instrumentation, one door for both protocols (a no-op without a tracer)."""

    def __init__(self, tracer=None, protocol: str = "http") -> None:
        self.tracer, self.protocol = tracer, protocol

    def _attributes(self, span, size: int) -> None:
        if self.protocol == "grpc":
            span.set_attribute("rpc.system", "grpc")
            span.set_attribute("rpc.service", GRPC_SERVICE)
            span.set_attribute("rpc.method", GRPC_NAME)
            span.set_attribute("rpc.request.size", size)
            span.set_attribute("rpc.response.size", size)
        else:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("http.request.body.size", size)
            span.set_attribute("http.response.body.size", size)

    @contextlib.contextmanager
    def server(self, carrier: dict[str, str], size: int) -> Iterator[None]:
        """A server span, child of the caller's propagated context, current while the body runs."""
        if self.tracer is None:
            yield
            return
        from opentelemetry import propagate, trace  # lazy: only a traced run needs the SDK

        span = self.tracer.start_span(
            "serve", context=propagate.extract(carrier), kind=trace.SpanKind.SERVER
        )
        self._attributes(span, size)
        with trace.use_span(span, end_on_exit=True):
            yield

    def client(self, size: int):
        """A started client span and the headers that propagate it (None, {} without a tracer)."""
        if self.tracer is None:
            return None, {}
        from opentelemetry import propagate, trace  # lazy: only a traced run needs the SDK

        span = self.tracer.start_span("call", kind=trace.SpanKind.CLIENT)
        self._attributes(span, size)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, carrier


# ---- HTTP/1.1 -----------------------------------------------------------------------------------


class _HttpDownstream:
    """One kept-alive connection to a downstream service, one request at a time, on the event loop."""

    def __init__(self, address: str) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.lock = asyncio.Lock()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, body: bytes, spans: Spans) -> None:
        span, carrier = spans.client(len(body))
        try:
            async with self.lock:
                await self._exchange(body, carrier)
        finally:
            if span is not None:
                span.end()

    async def _exchange(self, body: bytes, carrier: dict[str, str]) -> None:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        extra = "".join(f"{k}: {v}\r\n" for k, v in carrier.items()).encode()
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nhost: app\r\ncontent-length: %d\r\n%s\r\n%s"
                         % (len(body), extra, body))  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            headers = _headers(head)
            got = await reader.readexactly(int(headers.get("content-length", 0)))
            if not head.startswith(b"HTTP/1.1 200") or len(got) != len(body):
                raise ConnectionError(f"downstream answered {head[:40]!r} with {len(got)} B")
        except (OSError, asyncio.IncompleteReadError) as exc:
            writer.close()
            self.streams = None  # a broken connection is never reused
            raise ConnectionError(f"downstream {self.host}:{self.port}: {exc}") from exc


def _headers(head: bytes) -> dict[str, str]:
    carrier = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        carrier[name.strip().lower().decode()] = value.strip().decode()
    return carrier


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    calls: list[_HttpDownstream],
    parallel: bool,
    work_ns: int,
    spans: Spans,
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = _headers(head)
            if "transfer-encoding" in headers:
                buf = bytearray(head)
                while (framed := dechunk(buf, len(head))) is None:
                    buf += await reader.read(65536)
                body = framed[0]
            else:
                body = await reader.readexactly(int(headers.get("content-length", 0)))
            with spans.server(headers, len(body)):
                spin(work_ns)
                if parallel:
                    await asyncio.gather(*(d.call(body, spans) for d in calls))
                else:
                    for d in calls:
                        await d.call(body, spans)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def serve_http(listen: str, calls: list[str], parallel: bool, work_ns: int, spans: Spans) -> None:
    host, port = listen.rsplit(":", 1)
    downstream = [_HttpDownstream(a) for a in calls]

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, downstream, parallel, work_ns, spans), host, int(port)
        )
        async with server:
            await server.serve_forever()

    loop = new_event_loop()
    serving = loop.create_task(serve())
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        loop.run_until_complete(serving)


# ---- gRPC ---------------------------------------------------------------------------------------


def _finish(call) -> None:
    future, span = call
    try:
        future.result()
    finally:
        if span is not None:
            span.end()


def serve_grpc(listen: str, calls: list[str], parallel: bool, work_ns: int, spans: Spans) -> None:
    """A grpcio server whose unary handler works, then calls each downstream service's same method."""
    from concurrent import futures  # lazy: the HTTP service never loads grpcio

    import grpc  # lazy: the HTTP service never loads grpcio

    options = [("grpc.enable_http_proxy", 0)]
    stubs = [grpc.insecure_channel(a, options=options).unary_unary(GRPC_METHOD) for a in calls]

    def call_all(body: bytes) -> None:
        started = []
        for stub in stubs:
            span, carrier = spans.client(len(body))
            future = stub.future(body, timeout=10, metadata=tuple(carrier.items()))
            started.append((future, span))
            if not parallel:
                _finish(started.pop())
        for done in started:
            _finish(done)

    def unary(body: bytes, context) -> bytes:
        carrier = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with spans.server(carrier, len(body)):
            spin(work_ns)
            call_all(body)
        return body

    handler = grpc.method_handlers_generic_handler(
        GRPC_SERVICE, {GRPC_NAME: grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    server.add_generic_rpc_handlers((handler,))
    host, port = listen.rsplit(":", 1)
    server.add_insecure_port(f"{'[::]' if host in ('0.0.0.0', '') else host}:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.wait_for_termination()


# ---- tracing ------------------------------------------------------------------------------------


# Spans held per service until it stops: far more than a validation run's traced requests make.
HELD_SPANS = 1 << 16


def _tracer(service: str, path: str):
    """An OpenTelemetry tracer whose spans land in `path` as OTLP JSON lines when its provider
    shuts down, and the provider."""
    # lazy: only a traced run loads the SDK, protobuf and the OTLP encoder
    from google.protobuf.json_format import MessageToJson
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class OtlpJsonFile(SpanExporter):
        def export(self, spans):
            line = MessageToJson(encode_spans(spans), indent=None)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # No timed export and no batch that fills up during a run: only shutdown() writes the spans.
    held = BatchSpanProcessor(OtlpJsonFile(), max_queue_size=HELD_SPANS,
                              max_export_batch_size=HELD_SPANS, schedule_delay_millis=86_400_000)  # fmt: skip
    provider.add_span_processor(held)
    return provider.get_tracer("pyproxy.bench.validation_app"), provider


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--call", action="append", default=[])
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--work-us", type=float, default=0.0)
    parser.add_argument("--name", default="service", help="service.name of its spans")
    parser.add_argument("--trace", help="append OTLP JSON spans to this file")
    args = parser.parse_args(argv)
    tracer, provider = _tracer(args.name, args.trace) if args.trace else (None, None)
    serve = serve_grpc if args.protocol == "grpc" else serve_http
    try:
        serve(args.listen, args.call, args.parallel, int(args.work_us * 1000),
              Spans(tracer, args.protocol))  # fmt: skip
    finally:
        if provider is not None:
            provider.shutdown()  # the held spans written


if __name__ == "__main__":
    main()
