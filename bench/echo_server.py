"""Echo upstreams for the demo and the benchmarks: raw TCP (uvloop Protocol), HTTP/1.1 and h2c
bodies, gRPC unary; `--work-us` spins that long before each answer (a service's own work)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from typing import cast

from pyproxy.addresses import parse_address
from pyproxy.eventloop import new_event_loop


def spin(work_ns: int) -> None:
    """A service's own work: busy CPU for work_ns."""
    end = time.perf_counter_ns() + work_ns
    while time.perf_counter_ns() < end:
        pass


class _Echo(asyncio.Protocol):
    work_ns = 0  # spun before each answer (`--work-us`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's: it writes
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.work_ns:
            spin(self.work_ns)
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


class _HttpEcho(_Echo):
    """HTTP/1.1 keep-alive: each request's Content-Length body comes back as a 200's body."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length, chunked = 0, False
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            framed = (
                dechunk(self.buffer, end + 4) if chunked else _fixed(self.buffer, end + 4, length)
            )
            if framed is None:
                return
            body, consumed = framed
            del self.buffer[:consumed]
            if self.work_ns:
                spin(self.work_ns)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )


class _H2Echo(_Echo):
    """h2c (prior knowledge): each stream's request body comes back as a 200's body."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        super().connection_made(transport)
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.bodies: dict[int, bytearray] = {}
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        from h2.events import DataReceived, StreamEnded, StreamReset

        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                body = bytes(self.bodies.pop(event.stream_id, b""))
                if self.work_ns:
                    spin(self.work_ns)
                headers = [(b":status", b"200"), (b"content-length", b"%d" % len(body))]
                conn.send_headers(event.stream_id, headers, end_stream=not body)
                if body:  # small echoes: within the default windows
                    conn.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, StreamReset):
                self.bodies.pop(event.stream_id, None)
        self.transport.write(conn.data_to_send())


def _fixed(buf: bytearray, start: int, length: int) -> tuple[bytes, int] | None:
    if len(buf) < start + length:
        return None
    return bytes(buf[start : start + length]), start + length


def dechunk(buf: bytearray, at: int) -> tuple[bytes, int] | None:
    """A chunked body (some proxies re-frame requests this way); None until it is complete."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(bytes(buf[at:eol]).split(b";")[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", eol)
            if buf[eol : eol + 4] == b"\r\n\r\n":
                return bytes(body), eol + 4
            return None if trailer_end < 0 else (bytes(body), trailer_end + 4)
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        at = eol + 2 + size + 2


async def serve(address: str, protocol: type[asyncio.Protocol] = _Echo) -> None:
    target = parse_address(address)
    loop = asyncio.get_running_loop()
    if target.is_unix:
        server = await loop.create_unix_server(protocol, target.path)
    else:
        server = await loop.create_server(protocol, target.host, target.port, reuse_address=True)
    async with server:
        await server.serve_forever()


def serve_grpc(port: int, host: str = "127.0.0.1", work_ns: int = 0) -> None:
    """The gRPC echo: unary `bench.Echo/Unary` answers with the request (grpcio, 16 threads)."""
    from concurrent import futures

    import grpc

    def echo(request: bytes, context) -> bytes:
        if work_ns:
            spin(work_ns)
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--protocol", choices=("tcp", "http", "http2", "grpc"), default="tcp")
    parser.add_argument("--work-us", type=float, default=0.0, help="spun before each answer")
    args = parser.parse_args()
    work_ns = int(args.work_us * 1000)
    if args.protocol == "grpc":
        listen = parse_address(args.listen)
        serve_grpc(listen.port, listen.host, work_ns)
        return
    loop = new_event_loop()
    try:
        protocols = {"tcp": _Echo, "http": _HttpEcho, "http2": _H2Echo}
        protocol = type("WorkingEcho", (protocols[args.protocol],), {"work_ns": work_ns})
        loop.run_until_complete(serve(args.listen, protocol))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
