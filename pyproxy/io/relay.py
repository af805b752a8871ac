"""The userspace TCP relay: two sockets, one bounded buffer per direction, readiness-driven.

Backpressure is structural: a direction reads into its buffer only when the
buffer is empty. If the destination does not take everything, reading from
the source stops (remove_reader) and resumes only once the rest is written,
so a slow reader can never make the proxy hold more than one buffer per
direction. Every syscall is timed here, into the listener's stage block:
the app-facing socket's recv/send count as `ipc`, the peer-facing socket's
as `read`/`write`; the Python work between them is `other`; each readiness
callback is one `notify` event (its cost is derived, see io/notify.py).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from time import perf_counter_ns

from pyproxy.counters import (
    DOWNSTREAM_RX,
    DOWNSTREAM_TX,
    FLAG_BASE,
    FLAG_INDEX,
    IPC,
    MESSAGES,
    NOTIFY,
    OTHER,
    READ,
    STAGE_EVENTS,
    STAGE_NS,
    UPSTREAM_RX,
    UPSTREAM_TX,
    WRITE,
    observe_duration,
)
from pyproxy.io.sockets import abort

NOTIFY_EVENTS = STAGE_EVENTS + NOTIFY
OTHER_NS = STAGE_NS + OTHER
DOWNSTREAM, UPSTREAM = "downstream", "upstream"


class _Direction:
    """One way of the relay: read from `src` into a private buffer, write it to `dst`."""

    __slots__ = (
        "relay",
        "src",
        "dst",
        "src_fd",
        "dst_fd",
        "buf",
        "view",
        "start",
        "end",
        "eof",
        "moved",
        "read_ns",
        "read_events",
        "write_ns",
        "write_events",
        "rx",
        "tx",
        "is_request",
        "src_side",
        "dst_side",
    )

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        buffer_size: int,
        src_side: str,
        app_side: str,
    ) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.buf = bytearray(buffer_size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.eof = False
        self.moved = 0
        self.src_side = src_side
        self.dst_side = UPSTREAM if src_side == DOWNSTREAM else DOWNSTREAM
        read_stage = IPC if src_side == app_side else READ
        write_stage = IPC if self.dst_side == app_side else WRITE
        self.read_ns, self.read_events = STAGE_NS + read_stage, STAGE_EVENTS + read_stage
        self.write_ns, self.write_events = STAGE_NS + write_stage, STAGE_EVENTS + write_stage
        self.is_request = src_side == DOWNSTREAM
        self.rx = DOWNSTREAM_RX if self.is_request else UPSTREAM_RX
        self.tx = UPSTREAM_TX if self.is_request else DOWNSTREAM_TX

    def on_readable(self) -> None:
        relay = self.relay
        block = relay.block
        timed = relay.timed
        if timed:
            t0 = perf_counter_ns()
        try:
            n = self.src.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError:
            relay.reset_by(self.src_side)
            return
        if timed:
            t1 = perf_counter_ns()
            block[self.read_ns] += t1 - t0
            block[self.read_events] += 1
            block[NOTIFY_EVENTS] += 1
        if n == 0:
            self.eof = True
            relay.loop.remove_reader(self.src_fd)
            self._shutdown_dst()
            return
        block[self.rx] += n
        if self.is_request:
            block[MESSAGES] += 1
        if timed:
            t2 = perf_counter_ns()
            block[OTHER_NS] += t2 - t1
        try:
            sent = self.dst.send(self.view[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            relay.reset_by(self.dst_side)
            return
        if timed:
            block[self.write_ns] += perf_counter_ns() - t2
            block[self.write_events] += 1
        block[self.tx] += sent
        self.moved += sent
        if sent < n:
            # Destination is full: park the rest and stop reading until it drains.
            self.start, self.end = sent, n
            loop = relay.loop
            loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)

    def on_writable(self) -> None:
        relay = self.relay
        block = relay.block
        timed = relay.timed
        if timed:
            t0 = perf_counter_ns()
        try:
            sent = self.dst.send(self.view[self.start : self.end])
        except BlockingIOError:
            return
        except OSError:
            relay.reset_by(self.dst_side)
            return
        if timed:
            block[self.write_ns] += perf_counter_ns() - t0
            block[self.write_events] += 1
            block[NOTIFY_EVENTS] += 1
        block[self.tx] += sent
        self.moved += sent
        self.start += sent
        if self.start == self.end:
            loop = relay.loop
            loop.remove_writer(self.dst_fd)
            loop.add_reader(self.src_fd, self.on_readable)

    def _shutdown_dst(self) -> None:
        # Half-close travels: the source's FIN becomes our FIN toward the destination.
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.relay.direction_finished()


class Relay:
    """A live TCP-mode connection pair; closes itself when both directions end, on reset or idle."""

    __slots__ = (
        "loop",
        "block",
        "timed",
        "downstream",
        "upstream",
        "_request",
        "_response",
        "_started_ns",
        "_closed",
        "_on_close",
        "_idle_timeout",
        "_idle_handle",
        "_idle_mark",
        "_idle_strikes",
        "flag",
    )

    def __init__(
        self,
        loop,
        downstream: socket.socket,
        upstream: socket.socket,
        block: memoryview,
        *,
        timed: bool,
        app_side: str,
        buffer_size: int,
        idle_timeout: float,
        started_ns: int,
        on_close: Callable[[Relay], None],
    ) -> None:
        self.loop = loop
        self.block = block
        self.timed = timed
        self.downstream, self.upstream = downstream, upstream
        self._request = _Direction(self, downstream, upstream, buffer_size, DOWNSTREAM, app_side)
        self._response = _Direction(self, upstream, downstream, buffer_size, UPSTREAM, app_side)
        self._started_ns = started_ns
        self._closed = False
        self._on_close = on_close
        self._idle_timeout = idle_timeout
        self._idle_mark = 0
        self._idle_strikes = 0
        # Checked every half timeout; two quiet checks in a row close it, so an idle
        # connection lives between 1x and 1.5x the timeout, at one timer per half period.
        self._idle_handle = (
            loop.call_later(idle_timeout / 2, self._check_idle) if idle_timeout > 0 else None
        )
        self.flag = ""

    def start(self) -> None:
        self.loop.add_reader(self._request.src_fd, self._request.on_readable)
        self.loop.add_reader(self._response.src_fd, self._response.on_readable)

    @property
    def bytes_moved(self) -> tuple[int, int]:
        return self._request.moved, self._response.moved

    def direction_finished(self) -> None:
        if self._request.eof and self._response.eof:
            self.close()

    def reset_by(self, side: str) -> None:
        """One side reset (or failed): reset the other so the peer sees what happened."""
        self.close(flag="UR" if side == UPSTREAM else "DR", reset=True)

    def _check_idle(self) -> None:
        mark = self._request.moved + self._response.moved
        if mark == self._idle_mark:
            self._idle_strikes += 1
            if self._idle_strikes >= 2:
                self.close(flag="SI")
                return
        else:
            self._idle_mark, self._idle_strikes = mark, 0
        self._idle_handle = self.loop.call_later(self._idle_timeout / 2, self._check_idle)

    def close(self, flag: str = "", reset: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.flag = flag
        loop = self.loop
        for sock in (self.downstream, self.upstream):
            fd = sock.fileno()
            if fd >= 0:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
            if reset:
                abort(sock)
            else:
                sock.close()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        block = self.block
        if flag:
            block[FLAG_BASE + FLAG_INDEX[flag]] += 1
        observe_duration(block, perf_counter_ns() - self._started_ns)
        self._on_close(self)
