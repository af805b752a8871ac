"""The splice(2) relay backend: bytes go socket -> pipe -> socket inside the kernel, never through Python.

Same structure and accounting as the copy relay (io/relay.py): the buffer is
a pipe of `buffer_size` bytes instead of a bytearray, and pipes are shared the
same way (io/buffer_pool.py): a direction splices into the worker's top empty
pipe and out again at once, and keeps that pipe only while the destination
does not take everything, so an idle connection holds no pipe (no fds, no
pipe pages). A direction reads only when it holds nothing and stops reading
while the destination is full, so the proxy never holds more than one pipe's
worth per direction. The readable step runs whole in C (io/relay_step.py);
the pipe a destination left bytes in drains from Python here. Every splice
call is timed into the stage of the socket it touches (app-facing: `ipc`,
peer-facing: `read`/`write`).
Works on TCP and Unix stream sockets alike. TCP mode only: nothing above the
I/O layer ever sees the bytes.
"""

from __future__ import annotations

import os
import socket
from time import perf_counter_ns

from pyproxy import native  # type: ignore[attr-defined]  # mapped from native/ by pyproject
from pyproxy.io.buffer_pool import Pool
from pyproxy.io.relay import DOWNSTREAM, UPSTREAM, Relay, _Direction
from pyproxy.io.relay_step import NativeDirection, Scratch

EAGAIN = native.EAGAIN
_lib = native.lib


Pipe = tuple[int, int, int]  # read fd, write fd, capacity

_PIPE_POOLS: dict[int, Scratch] = {}


def _close_pipe(pipe: Pipe) -> None:
    for fd in pipe[:2]:
        try:
            os.close(fd)
        except OSError:
            pass


def pipe_scratch(size: int) -> Scratch:
    """This process's pool of empty pipes of `size` bytes (only empty pipes are ever given back)."""
    scratch = _PIPE_POOLS.get(size)
    if scratch is None:
        pool = Pool(lambda: native.pipe(size), _close_pipe)
        scratch = _PIPE_POOLS[size] = Scratch(pool, pipes=True)
    return scratch


class _SpliceDirection(NativeDirection):
    """One way of the relay through a pooled pipe: the C step splices in from `src` and out to `dst`."""

    __slots__ = ("pipe", "in_pipe")

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        buffer_size: int,
        src_side: str,
        app_side: str,
    ) -> None:
        super().__init__(
            relay, src, dst, pipe_scratch(buffer_size), _lib.pp_splice_step, src_side, app_side
        )
        self.pipe: Pipe | None = None  # taken from the pool while it holds bytes
        self.in_pipe = 0

    def park(self, item: Pipe, got: int, sent: int) -> None:
        # The rest waits in the pipe, which this direction now owns (a reset closes it).
        self.pipe = item
        self.in_pipe = got - sent

    def on_writable(self) -> None:
        relay = self.relay
        pipe = self.pipe
        assert pipe is not None, "writable is watched only while a pipe holds bytes"
        t0 = perf_counter_ns() if relay.timed else 0
        sent = _lib.pp_splice_out(pipe[0], self.dst_fd, self.in_pipe)
        if sent < 0:
            if sent != EAGAIN:
                relay.reset_by(self.dst_side)
            return
        self._sent(sent, t0, True)
        self.in_pipe -= sent
        if not self.in_pipe:
            self.pipe = None
            self.scratch.give(pipe)
            relay.loop.remove_writer(self.dst_fd)
            self.arm_reader()

    def release(self) -> None:
        # A pipe still held has bytes nobody will read: close it rather than pool it.
        if self.pipe is not None:
            _close_pipe(self.pipe)
            self.pipe = None


class SpliceRelay(Relay):
    """A TCP-mode connection relayed with splice(2) through the worker's pooled pipes."""

    __slots__ = ()

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        down, up = self.downstream, self.upstream
        return (
            _SpliceDirection(self, down, up, buffer_size, DOWNSTREAM, app_side),
            _SpliceDirection(self, up, down, buffer_size, UPSTREAM, app_side),
        )
