"""A tiny HTTP/1.1 service for validating predictions: answer after calling downstream services.

`--call ADDR` (repeatable) names downstream services; `--parallel` calls them
at once, otherwise one after another. Each request's body is forwarded as the
body of every downstream call, and echoed back once they all answered.
`--work-us` spins the CPU that long per request (the service's own work).
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

    async def call(self, size: int) -> None:
        async with self.lock:
            if size not in self.exchangers:
                self.exchangers[size] = HttpExchanger(self.address, size)
            try:
                # A blocking exchange in a thread keeps parallel calls parallel.
                await asyncio.to_thread(self.exchangers[size].exchange)
            except (OSError, ConnectionError):
                self.exchangers.pop(size).close()  # a broken connection is never reused
                raise


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, calls, parallel, work_ns
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
            end = time.perf_counter_ns() + work_ns
            while time.perf_counter_ns() < end:
                pass
            if parallel:
                await asyncio.gather(*(d.call(len(body)) for d in calls))
            else:
                for d in calls:
                    await d.call(len(body))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--call", action="append", default=[])
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--work-us", type=float, default=0.0)
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    calls = [_Downstream(a) for a in args.call]

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, calls, args.parallel, int(args.work_us * 1000)),
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
