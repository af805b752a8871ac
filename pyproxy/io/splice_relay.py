"""The splice(2) relay backend: bytes go socket -> pipe -> socket inside the kernel, never through Python.

Same structure and accounting as the copy relay (io/relay.py): one bounded
buffer per direction, here a pipe of `buffer_size` bytes instead of a
bytearray; a direction reads only into an empty pipe and stops reading while
the destination does not take everything, so the proxy never holds more than
one pipe's worth per direction. Every splice call is timed into the stage of
the socket it touches (app-facing: `ipc`, peer-facing: `read`/`write`).
Works on TCP and Unix stream sockets alike. TCP mode only: nothing above the
I/O layer ever sees the bytes.
"""

from __future__ import annotations

import os
import socket
from time import perf_counter_ns

from pyproxy import native  # type: ignore[attr-defined]  # mapped from native/ by pyproject
from pyproxy.io.relay import DOWNSTREAM, UPSTREAM, Relay, _Direction

EAGAIN = native.EAGAIN
_lib = native.lib


class _SpliceDirection(_Direction):
    """One way of the relay through a private pipe: splice in from `src`, splice out to `dst`."""

    __slots__ = ("pipe_rd", "pipe_wr", "capacity", "in_pipe")

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        buffer_size: int,
        src_side: str,
        app_side: str,
    ) -> None:
        # No userspace buffer: the pipe is the buffer (stage slots and sides come from the base).
        super().__init__(relay, src, dst, 0, src_side, app_side)
        self.pipe_rd, self.pipe_wr, self.capacity = native.pipe(buffer_size)
        self.in_pipe = 0

    def on_readable(self) -> None:
        relay = self.relay
        t0 = perf_counter_ns() if relay.timed else 0
        n = _lib.pp_splice_in(self.src_fd, self.pipe_wr, self.capacity)
        if n < 0:
            if n != EAGAIN:
                relay.reset_by(self.src_side)
            return
        t2 = self._received(n, t0)
        if t2 < 0:
            return
        sent = _lib.pp_splice_out(self.pipe_rd, self.dst_fd, n)
        if sent < 0:
            if sent != EAGAIN:
                relay.reset_by(self.dst_side)
                return
            sent = 0
        self._sent(sent, t2, False)
        if sent < n:
            # Destination is full: the rest waits in the pipe; stop reading until it drains.
            self.in_pipe = n - sent
            loop = relay.loop
            loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)

    def on_writable(self) -> None:
        relay = self.relay
        t0 = perf_counter_ns() if relay.timed else 0
        sent = _lib.pp_splice_out(self.pipe_rd, self.dst_fd, self.in_pipe)
        if sent < 0:
            if sent != EAGAIN:
                relay.reset_by(self.dst_side)
            return
        self._sent(sent, t0, True)
        self.in_pipe -= sent
        if not self.in_pipe:
            loop = relay.loop
            loop.remove_writer(self.dst_fd)
            loop.add_reader(self.src_fd, self.on_readable)

    def close_pipe(self) -> None:
        for fd in (self.pipe_rd, self.pipe_wr):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipe_rd = self.pipe_wr = -1


class SpliceRelay(Relay):
    """A TCP-mode connection relayed with splice(2); pipes are closed with the sockets."""

    __slots__ = ()

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        down, up = self.downstream, self.upstream
        request = _SpliceDirection(self, down, up, buffer_size, DOWNSTREAM, app_side)
        try:
            response = _SpliceDirection(self, up, down, buffer_size, UPSTREAM, app_side)
        except BaseException:
            request.close_pipe()
            raise
        return request, response

    def _close_sockets(self, reset: bool) -> None:
        super()._close_sockets(reset)
        self._request.close_pipe()  # type: ignore[attr-defined]  # _SpliceDirection, see _directions
        self._response.close_pipe()  # type: ignore[attr-defined]
