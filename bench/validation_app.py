"""A tiny HTTP/1.1 service for validating predictions: answer after calling downstream services.

`--call ADDR` (repeatable) names downstream services; `--parallel` calls them
at once, otherwise one after another. Each request's body is forwarded as the
body of every downstream call, and echoed back once they all answered.
`--work-us` spins the CPU that long per request (the service's own work).
With `--trace FILE` the service records OpenTelemetry spans (a server span
per request, a client span per downstream call, W3C `traceparent`
propagated) and appends them to FILE as OTLP JSON, one export per line.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pyproxy.bench.driver import HttpExchanger
from pyproxy.bench.echo_server import dechunk

from pyproxy.eventloop import new_event_loop


class _Downstream:
    """One kept-alive connection to a downstream service, one request at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lock = asyncio.Lock()
        self.exchangers: dict[int, HttpExchanger] = {}

    async def call(self, size: int, tracer=None) -> None:
        if tracer is None:
            return await self._call(size, b"")
        from opentelemetry import propagate, trace

        with tracer.start_as_current_span("call", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("http.request.body.size", size)
            span.set_attribute("http.response.body.size", size)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            header = "".join(f"{k}: {v}" for k, v in carrier.items()).encode()
            await self._call(size, header)

    async def _call(self, size: int, header: bytes) -> None:
        async with self.lock:
            if size not in self.exchangers:
                self.exchangers[size] = HttpExchanger(self.address, size)
            try:
                # A blocking exchange in a thread keeps parallel calls parallel.
                await asyncio.to_thread(self.exchangers[size].exchange, header)
            except (OSError, ConnectionError):
                self.exchangers.pop(size).close()  # a broken connection is never reused
                raise


async def _serve_one(head: bytes, size: int, calls, parallel: bool, work_ns: int, tracer) -> None:
    """The service's own work, then its downstream calls, inside a server span when tracing."""
    span = None
    if tracer is not None:
        from opentelemetry import propagate, trace

        carrier = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            carrier[name.strip().lower().decode()] = value.strip().decode()
        span = tracer.start_span(
            "serve", context=propagate.extract(carrier), kind=trace.SpanKind.SERVER
        )
        span.set_attribute("http.request.method", "POST")
        span.set_attribute("http.request.body.size", size)
        span.set_attribute("http.response.body.size", size)
        scope = trace.use_span(span, end_on_exit=True)
        scope.__enter__()
    try:
        end = time.perf_counter_ns() + work_ns
        while time.perf_counter_ns() < end:
            pass
        if parallel:
            await asyncio.gather(*(d.call(size, tracer) for d in calls))
        else:
            for d in calls:
                await d.call(size, tracer)
    finally:
        if span is not None:
            scope.__exit__(None, None, None)


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, calls, parallel, work_ns, tracer
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length, chunked = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"transfer-encoding":
                    chunked = True
            if chunked:
                buf = bytearray(head)
                while (framed := dechunk(buf, len(head))) is None:
                    buf += await reader.read(65536)
                body = framed[0]
            else:
                body = await reader.readexactly(length)
            await _serve_one(head, len(body), calls, parallel, work_ns, tracer)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _tracer(service: str, path: str):
    """An OpenTelemetry tracer whose spans land in `path` as OTLP JSON lines."""
    from google.protobuf.json_format import MessageToJson
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class OtlpJsonFile(SpanExporter):
        def export(self, spans):
            line = MessageToJson(encode_spans(spans), indent=None)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFile()))
    return provider.get_tracer("pyproxy.bench.validation_app")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--call", action="append", default=[])
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--work-us", type=float, default=0.0)
    parser.add_argument("--name", default="service", help="service.name of its spans")
    parser.add_argument("--trace", help="append OTLP JSON spans to this file")
    args = parser.parse_args(argv)
    tracer = _tracer(args.name, args.trace) if args.trace else None
    host, port = args.listen.rsplit(":", 1)
    calls = [_Downstream(a) for a in args.call]

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, calls, args.parallel, int(args.work_us * 1000), tracer),
            host,
            int(port),
        )
        async with server:
            await server.serve_forever()

    loop = new_event_loop()
    try:
        loop.run_until_complete(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
