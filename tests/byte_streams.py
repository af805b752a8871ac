"""Test helpers for byte-exact transfers through the proxy: a TCP or Unix "app" that answers a stream with a stream.

The client's first 9 bytes say how many bytes the app sends back and when:
right away, concurrently with the request (both directions at once), or only
after the request's EOF (so the reply travels after a half-close). Payloads
are deterministic (seeded), hashed on the fly, never held whole in memory.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
from collections.abc import Callable

from conftest import recv_exactly
from servers import ThreadedServer

HEADER = struct.Struct("!QB")
CONCURRENT, AFTER_EOF = 0, 1
CHUNK = 256 * 1024


def payload_chunks(total: int, seed: int):
    """Deterministic pseudo-random bytes in chunks, so sender and checker agree without storing them."""
    rng = random.Random(seed)
    left = total
    while left:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def digest_of(total: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in payload_chunks(total, seed):
        h.update(chunk)
    return h.hexdigest()


def send_payload(sock: socket.socket, total: int, seed: int) -> None:
    for chunk in payload_chunks(total, seed):
        sock.sendall(chunk)


def read_to_eof(sock: socket.socket) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(buf)
        if not got:
            return n, h.hexdigest()
        h.update(view[:got])
        n += got


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (connector, acceptor)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
    return c, s


class Sink(threading.Thread):
    """Reads to EOF (or `limit` bytes), hashing, so a large transfer needs no second copy."""

    def __init__(self, sock: socket.socket, limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.sock, self.limit = sock, limit
        self.hash = hashlib.sha256()
        self.count = 0
        self.eof = False

    def run(self) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while self.limit is None or self.count < self.limit:
            want = len(buf) if self.limit is None else min(len(buf), self.limit - self.count)
            n = self.sock.recv_into(buf, want)
            if n == 0:
                self.eof = True
                return
            self.hash.update(view[:n])
            self.count += n


def flood_handler(total: int, done: threading.Event) -> Callable[[socket.socket], None]:
    """An upstream that sends ``total`` random bytes as fast as the peer takes them (a slow
    consumer's far end); ``done`` is set once it stopped, all sent or cut off."""

    def handle(conn: socket.socket) -> None:
        chunk = os.urandom(1024 * 1024)
        sent = 0
        conn.settimeout(60)
        try:
            while sent < total:
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the proxy closed it: the test is over
        finally:
            done.set()

    return handle


def app_handler(results: list) -> Callable[[socket.socket], None]:
    """The app side: reads the request to EOF and sends the reply (seed 2) as the header asks."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(60)
        reply_size, when = HEADER.unpack(recv_exactly(conn, HEADER.size))
        if when == CONCURRENT:
            # Our FIN may travel while the request is still streaming the other way.
            sender = threading.Thread(target=_send_and_close, args=(conn, reply_size))
            sender.start()
            got = read_to_eof(conn)
            sender.join(60)
        else:
            got = read_to_eof(conn)
            _send_and_close(conn, reply_size)
        results.append(got)

    return handle


def _send_and_close(conn: socket.socket, size: int) -> None:
    send_payload(conn, size, 2)
    conn.shutdown(socket.SHUT_WR)


class UnixServer(ThreadedServer):
    """A real Unix-socket server; `handler(conn)` runs in a thread per connection."""

    def __init__(self, path: str, handler: Callable[[socket.socket], None]) -> None:
        super().__init__(handler, unix_path=path)
        self.path = path


def connect(address: str, timeout: float = 60) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[5:])
        return sock
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(address: str, request_size: int, reply_size: int, when: int) -> dict:
    """One connection: send `request_size` bytes (seed 1) then half-close; read the reply to EOF."""
    sock = connect(address)
    try:
        sock.sendall(HEADER.pack(reply_size, when))
        error: list[BaseException] = []

        def upload() -> None:
            try:
                send_payload(sock, request_size, 1)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # re-raised below
                error.append(exc)

        uploader = threading.Thread(target=upload)
        uploader.start()
        received = read_to_eof(sock)
        uploader.join(60)
        if error:
            raise error[0]
        return {"received": received}
    finally:
        sock.close()
