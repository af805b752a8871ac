"""The least an HTTP/1 keep-alive relay written in Python costs on this machine: a lower bound.

Not a proxy: no validation, no routing, no hop-by-hop handling, no limits, no
accounting, no error handling; it assumes every response carries
Content-Length and that each request arrives in one read. It makes exactly
the syscalls a proxy must (one recv and one send per direction per request,
raw non-blocking sockets on uvloop readiness callbacks, one pooled upstream
connection per downstream connection) and as little Python as possible
around them. http_bench runs it beside the real proxies, so "what is left is
Python" can be read against what any Python proxy has to pay.

    python -m pyproxy.bench.python_floor LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop


def serve(listen_port: int, upstream_port: int) -> None:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(512)
    listener.setblocking(False)

    class Relay:
        __slots__ = ("down", "up", "pending")

        def __init__(self, down: socket.socket) -> None:
            self.down = down
            self.up = socket.create_connection(("127.0.0.1", upstream_port))
            self.up.setblocking(False)
            self.up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pending = b""
            loop.add_reader(down.fileno(), self.from_client)
            loop.add_reader(self.up.fileno(), self.from_upstream)

        def from_client(self) -> None:
            try:
                data = self.down.recv(65536)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.down.fileno())
                loop.remove_reader(self.up.fileno())
                self.down.close()
                self.up.close()
                return
            self.up.send(data)

        def from_upstream(self) -> None:
            data = self.pending + self.up.recv(65536)
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.pending = data
                return
            start = data.lower().find(b"\r\ncontent-length:", 0, end) + 17
            length = int(data[start : data.index(b"\r\n", start)])
            if len(data) < end + 4 + length:
                self.pending = data
                return
            self.pending = b""
            self.down.send(data)

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Relay(conn)

    loop.add_reader(listener.fileno(), accept)
    loop.run_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
