"""The userspace TCP relay: two sockets, at most one bounded buffer per direction, readiness-driven.

A direction reads into the worker's shared top buffer (io/buffer_pool.py) and
writes it straight on; it keeps a buffer of its own only while the
destination has not taken everything, so an idle connection holds none and
the worker's relay memory follows the bytes in flight. Backpressure is
structural: while a direction holds bytes, reading from its source stops
(remove_reader) and resumes only once the rest is written, so a slow reader
can never make the proxy hold more than one buffer per direction. Every
syscall is timed here, into the listener's stage block: the app-facing
socket's recv/send count as `ipc`, the peer-facing socket's as
`read`/`write`; the Python work between them is `other`; each readiness
callback is one `notify` event (its cost is derived, see io/notify.py).

This is the default backend (plain recv/send through userspace buffers).
Other backends (io/splice_relay.py, io/zerocopy_writer.py) subclass Relay and
override the per-connection hooks `_directions` and `_close_sockets`, so
choosing one costs nothing per message here; io/backends.py picks the class.
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
from pyproxy.io.buffer_pool import copy_pool
from pyproxy.io.sockets import abort

NOTIFY_EVENTS = STAGE_EVENTS + NOTIFY
OTHER_NS = STAGE_NS + OTHER
DOWNSTREAM, UPSTREAM = "downstream", "upstream"


class _Direction:
    """One way of the relay: read from `src` into a pooled buffer, write it to `dst`."""

    __slots__ = (
        "relay",
        "src",
        "dst",
        "src_fd",
        "dst_fd",
        "pool",
        "held",
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
        # No buffer of its own until the destination is full (backends without one pass 0).
        self.pool = copy_pool(buffer_size) if buffer_size else None
        self.held: tuple[bytearray, memoryview] | None = None  # taken from the pool
        self.view: memoryview | None = None  # the parked bytes are view[start:end]
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
        t0 = perf_counter_ns() if relay.timed else 0
        pool = self.pool
        assert pool is not None, "backends without a userspace buffer override on_readable"
        buf, view = pool.top()
        try:
            n = self.src.recv_into(buf)
        except BlockingIOError:
            return
        except OSError:
            relay.reset_by(self.src_side)
            return
        t2 = self._received(n, t0)
        if t2 < 0:
            return
        try:
            sent = self.dst.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            relay.reset_by(self.dst_side)
            return
        self._sent(sent, t2, False)
        if sent < n:
            # Destination is full: keep the buffer, park the rest, stop reading until it drains.
            self.held = pool.take()
            self.view = view
            self.start, self.end = sent, n
            loop = relay.loop
            loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)

    def on_writable(self) -> None:
        relay = self.relay
        t0 = perf_counter_ns() if relay.timed else 0
        view = self.view
        assert view is not None, "writable is watched only while bytes are parked"
        try:
            sent = self.dst.send(view[self.start : self.end])
        except BlockingIOError:
            return
        except OSError:
            relay.reset_by(self.dst_side)
            return
        self._sent(sent, t0, True)
        self.start += sent
        if self.start == self.end:
            self.release()
            relay.loop.remove_writer(self.dst_fd)
            self.drained()

    def drained(self) -> None:
        """The parked bytes are all written: read the source again."""
        self.arm_reader()

    def arm_reader(self) -> None:
        """Watch the source again (a backend whose readable step is native arms that instead)."""
        self.relay.loop.add_reader(self.src_fd, self.on_readable)

    def progress(self) -> int:
        """Bytes written so far, for the idle check."""
        return self.moved

    def release(self) -> None:
        """The parked bytes are gone (written, or the connection closed): the buffer goes back."""
        if self.held is not None and self.pool is not None:
            self.pool.give(self.held)
        self.held = self.view = None

    def finish(self) -> None:
        """The relay closed: give back whatever this direction holds."""
        self.release()

    # Accounting shared by every backend's readiness callbacks (copy, splice, zero-copy).

    def _received(self, n: int, t0: int) -> int:
        """Account a read of ``n`` bytes begun at ``t0`` (timed); the clock after it, or -1 at EOF."""
        relay = self.relay
        block = relay.block
        timed = relay.timed
        if timed:
            t1 = perf_counter_ns()
            block[self.read_ns] += t1 - t0
            block[self.read_events] += 1
            block[NOTIFY_EVENTS] += 1
        if n == 0:
            self.eof = True
            self._stop_reading()
            self._shutdown_dst()
            return -1
        block[self.rx] += n
        if self.is_request:
            block[MESSAGES] += 1
        if not timed:
            return 0
        t2 = perf_counter_ns()
        block[OTHER_NS] += t2 - t1
        return t2

    def _sent(self, sent: int, t0: int, notified: bool) -> None:
        """Account a write of ``sent`` bytes begun at ``t0`` (timed), from a writable wake-up or not."""
        relay = self.relay
        block = relay.block
        if relay.timed:
            block[self.write_ns] += perf_counter_ns() - t0
            block[self.write_events] += 1
            if notified:
                block[NOTIFY_EVENTS] += 1
        block[self.tx] += sent
        self.moved += sent

    def _stop_reading(self) -> None:
        self.relay.loop.remove_reader(self.src_fd)

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
        self._request, self._response = self._directions(buffer_size, app_side)
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

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        """The request and response directions (the backend hook, called once per connection)."""
        down, up = self.downstream, self.upstream
        return (
            _Direction(self, down, up, buffer_size, DOWNSTREAM, app_side),
            _Direction(self, up, down, buffer_size, UPSTREAM, app_side),
        )

    def preload(self, to_upstream: bytes, to_downstream: bytes) -> None:
        """Bytes that arrived before the relay took over (e.g. around an HTTP Upgrade) go out first."""
        for direction, data in ((self._request, to_upstream), (self._response, to_downstream)):
            direction.view = memoryview(data)
            direction.start, direction.end = 0, len(data)

    def start(self) -> None:
        loop = self.loop
        for direction in (self._request, self._response):
            if direction.end > direction.start:
                loop.add_writer(direction.dst_fd, direction.on_writable)
            else:
                direction.arm_reader()

    def direction_finished(self) -> None:
        if self._request.eof and self._response.eof:
            self.close()

    def reset_by(self, side: str) -> None:
        """One side reset (or failed): reset the other so the peer sees what happened."""
        self.close(flag="UR" if side == UPSTREAM else "DR", reset=True)

    def _check_idle(self) -> None:
        mark = self._request.progress() + self._response.progress()
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
        self._close_sockets(reset)
        self._request.finish()
        self._response.finish()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        block = self.block
        if flag:
            block[FLAG_BASE + FLAG_INDEX[flag]] += 1
        observe_duration(block, perf_counter_ns() - self._started_ns)
        self._on_close(self)

    def _close_sockets(self, reset: bool) -> None:
        """Stop watching both sockets and close them (with RST when `reset`); a backend hook."""
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
