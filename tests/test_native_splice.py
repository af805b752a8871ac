"""splice(2) relay primitives of pyproxy.native over real loopback TCP sockets."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import socket
import threading
import time

import pytest
from byte_streams import Sink, tcp_pair

from pyproxy import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

lib = native.lib
ffi = native.ffi


class Source(threading.Thread):
    """Writes data then half-closes: the relay must see EOF after the last byte."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.data = sock, data
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # surfaced by the test thread
            self.error = exc


def splice_relay(src: socket.socket, dst: socket.socket, pipe_size: int, deadline: float) -> int:
    """Reference non-blocking relay loop: src -> pipe -> dst until EOF; returns bytes moved."""
    src.setblocking(False)
    dst.setblocking(False)
    rfd, wfd, cap = native.pipe(pipe_size)
    in_pipe = moved = 0
    eof = False
    poller = select.poll()
    try:
        while time.monotonic() < deadline:
            progress = False
            if not eof and in_pipe < cap:
                r = lib.pp_splice_in(src.fileno(), wfd, cap - in_pipe)
                if r > 0:
                    in_pipe += r
                    progress = True
                elif r == 0:
                    eof = progress = True
                else:
                    assert r == native.EAGAIN, os.strerror(-r)
            if in_pipe:
                w = lib.pp_splice_out(rfd, dst.fileno(), in_pipe)
                if w > 0:
                    in_pipe -= w
                    moved += w
                    progress = True
                else:
                    assert w == native.EAGAIN, os.strerror(-w)
            if eof and not in_pipe:
                dst.shutdown(socket.SHUT_WR)
                return moved
            if not progress:
                poller.register(src, select.POLLIN if not eof and in_pipe < cap else 0)
                poller.register(dst, select.POLLOUT if in_pipe else 0)
                poller.poll(20)
                poller.unregister(src)
                poller.unregister(dst)
        raise TimeoutError(f"relay stalled after {moved} bytes")
    finally:
        os.close(rfd)
        os.close(wfd)


@pytest.mark.parametrize(
    "size",
    [1, 100, 4096, 65537, 1 << 20, 64 << 20],
    ids=["1B", "100B", "4KiB", "64KiB+1", "1MiB", "64MiB"],
)
def test_splice_relay_moves_exactly_the_bytes_then_eof(size: int) -> None:
    data = os.urandom(size)
    up_c, up_s = tcp_pair()  # source -> relay
    down_c, down_s = tcp_pair()  # relay -> sink
    src, sink = Source(up_c, data), Sink(down_s)
    src.start()
    sink.start()
    try:
        moved = splice_relay(up_s, down_c, 1 << 16, time.monotonic() + 60)
        sink.join(30)
        src.join(30)
    finally:
        for s in (up_c, up_s, down_c, down_s):
            s.close()
    assert src.error is None
    assert moved == size
    assert sink.eof and sink.count == size
    assert sink.hash.digest() == hashlib.sha256(data).digest()


def test_splice_in_distinguishes_eagain_from_eof() -> None:
    c, s = tcp_pair()
    rfd, wfd, _ = native.pipe()
    try:
        s.setblocking(False)
        assert lib.pp_splice_in(s.fileno(), wfd, 4096) == -errno.EAGAIN
        c.sendall(b"abc")
        deadline = time.monotonic() + 5
        while (r := lib.pp_splice_in(s.fileno(), wfd, 4096)) == -errno.EAGAIN:
            assert time.monotonic() < deadline
            select.select([s], [], [], 0.1)
        assert r == 3
        assert os.read(rfd, 10) == b"abc"
        c.shutdown(socket.SHUT_WR)
        select.select([s], [], [], 5)
        assert lib.pp_splice_in(s.fileno(), wfd, 4096) == 0
    finally:
        os.close(rfd)
        os.close(wfd)
        c.close()
        s.close()


def test_splice_in_reports_eagain_when_the_pipe_is_full() -> None:
    c, s = tcp_pair()
    rfd, wfd, cap = native.pipe(4096)
    try:
        assert cap == 4096
        s.setblocking(False)
        c.sendall(b"x" * 3 * cap)
        total = 0
        deadline = time.monotonic() + 5
        while total < cap:
            assert time.monotonic() < deadline
            r = lib.pp_splice_in(s.fileno(), wfd, 1 << 20)
            if r > 0:
                total += r
            else:
                select.select([s], [], [], 0.05)
        assert total == cap
        # Full pipe with data still queued on the socket: must not look like EOF.
        assert lib.pp_splice_in(s.fileno(), wfd, 1 << 20) == -errno.EAGAIN
    finally:
        os.close(rfd)
        os.close(wfd)
        c.close()
        s.close()


def test_splice_out_from_empty_pipe_would_block() -> None:
    c, s = tcp_pair()
    rfd, wfd, _ = native.pipe()
    try:
        assert lib.pp_splice_out(rfd, c.fileno(), 4096) == -errno.EAGAIN
    finally:
        os.close(rfd)
        os.close(wfd)
        c.close()
        s.close()


def test_splice_errors_are_negative_errno_not_exceptions() -> None:
    rfd, wfd, _ = native.pipe()
    try:
        assert lib.pp_splice_in(-1, wfd, 10) == -errno.EBADF
        # Splicing a pipe into itself is refused by the kernel: EINVAL, returned.
        assert lib.pp_splice_out(rfd, wfd, 10) == -errno.EINVAL
    finally:
        os.close(rfd)
        os.close(wfd)


def test_pipe_gets_the_requested_capacity() -> None:
    rfd, wfd, cap = native.pipe(1 << 20)
    try:
        assert cap == 1 << 20
        flags = os.get_blocking(rfd), os.get_blocking(wfd)
        assert flags == (False, False)
        assert not os.get_inheritable(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_relay_copy_moves_bytes_in_one_call() -> None:
    up_c, up_s = tcp_pair()
    down_c, down_s = tcp_pair()
    buf = ffi.new("char[]", 65536)
    sent = ffi.new("size_t *")
    try:
        up_s.setblocking(False)
        down_c.setblocking(False)
        assert lib.pp_relay_copy(up_s.fileno(), down_c.fileno(), buf, 65536, sent) == -errno.EAGAIN
        up_c.sendall(b"hello relay")
        select.select([up_s], [], [], 5)
        n = lib.pp_relay_copy(up_s.fileno(), down_c.fileno(), buf, 65536, sent)
        assert n == 11 and sent[0] == 11
        down_s.settimeout(5)
        assert down_s.recv(100) == b"hello relay"
        up_c.shutdown(socket.SHUT_WR)
        select.select([up_s], [], [], 5)
        assert lib.pp_relay_copy(up_s.fileno(), down_c.fileno(), buf, 65536, sent) == 0
    finally:
        for s in (up_c, up_s, down_c, down_s):
            s.close()
