"""Real servers for tests: a threaded TCP or Unix-socket server, and an echo handler for it."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable


class ThreadedServer:
    """A real TCP (or, with `unix_path`, Unix-socket) server; `handler(conn)` runs in a thread per connection."""

    def __init__(
        self,
        handler: Callable[[socket.socket], None],
        host: str = "127.0.0.1",
        backlog: int = 128,
        unix_path: str | None = None,
        nodelay: bool = False,
    ) -> None:
        if unix_path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.port = 0
            self.address = f"unix:{unix_path}"
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, 0))
            self.port = self.sock.getsockname()[1]
            self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.sock.listen(backlog)
        self.unix_path = unix_path
        self.nodelay = nodelay
        self.handler = handler
        self.errors: list[BaseException] = []
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:  # surfaced by the test through .errors
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        if self.unix_path is not None:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)
