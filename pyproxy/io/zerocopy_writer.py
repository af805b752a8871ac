"""The MSG_ZEROCOPY write backend: the copy relay, but chunks of at least `threshold` bytes go to TCP sockets zero-copy.

A zero-copy send lends the buffer to the kernel until its completion is
reaped, so a direction cannot read into it again right away: each direction
owns a small pool of ZC_BUFFERS buffers (each made on first use) and reads into a free one. When every
buffer is still lent out it stops reading from its source until a completion
returns one; that keeps the proxy's memory bounded at ZC_BUFFERS buffers per
direction, the same backpressure idea as the copy relay.

Completions arrive on the socket's error queue, which raises POLLERR. Under
uvloop that stops the socket's poll handle after one callback, so every
callback on a zerocopy socket starts with `_Watch.service()`: reap, and if
any notification was read since the last time, register its reader/writer
again (see native/zerocopy.py). When nothing is registered on the socket but
completions are outstanding (a half-closed peer, a blocked direction), a short
timer reaps instead. At close, a socket with lent buffers lingers (shut down,
reaped by the timer) until the kernel returns them, or is reset after
CLOSE_DRAIN_TIMEOUT, so no buffer is reused while the kernel may still read it.
Counters go to the listener block's ZC_* slots (/stats "zerocopy").
Unix sockets do not support MSG_ZEROCOPY: a direction writing to one sends by copy.
"""

from __future__ import annotations

import socket
from collections import deque
from time import perf_counter_ns

from pyproxy.counters import STAGE_NS, WRITE, ZC_BASE
from pyproxy.io.relay import DOWNSTREAM, UPSTREAM, Relay, _Direction
from pyproxy.io.sockets import abort
from pyproxy.native.zerocopy import ZeroCopySender

ZC_BUFFERS = 4  # per direction: enough to keep a bulk stream moving while completions are in flight
REAP_INTERVAL = 0.002  # seconds between reaps while nothing else watches a socket with lent buffers
CLOSE_DRAIN_TIMEOUT = 5.0  # longest a closed connection waits for its completions before a reset

(ZC_SENDS, ZC_PLAIN, ZC_FALLBACKS, ZC_COMPLETED, ZC_COPIED, ZC_NOTIFICATIONS, ZC_OUTSTANDING) = (
    ZC_BASE + i for i in range(7)
)


class _Plain:
    """Reader/writer registration on a socket that is not written zero-copy: straight to the loop."""

    __slots__ = ("loop", "fd")

    def __init__(self, loop, sock: socket.socket) -> None:
        self.loop, self.fd = loop, sock.fileno()

    def add_reader(self, callback) -> None:
        self.loop.add_reader(self.fd, callback)

    def remove_reader(self) -> None:
        self.loop.remove_reader(self.fd)

    def add_writer(self, callback) -> None:
        self.loop.add_writer(self.fd, callback)

    def remove_writer(self) -> None:
        self.loop.remove_writer(self.fd)

    def service(self) -> None:
        pass


class _Watch(_Plain):
    """A zerocopy socket: its sender, what is registered on it, and the reap timer."""

    __slots__ = (
        "relay",
        "sock",
        "sender",
        "reader",
        "writer",
        "armed_at",
        "timer",
        "lent",
        "owner",
        "small_sends",
        "reap_ns",
        "_published",
        "_deadline",
    )

    def __init__(self, relay: ZeroCopyRelay, sock: socket.socket) -> None:
        super().__init__(relay.loop, sock)
        self.relay = relay
        self.sock = sock
        self.reader = self.writer = None
        self.armed_at = 0
        self.timer = None
        # Pool slot of each zerocopy send in flight, in send order: the sender
        # releases in that order, so on_release pops from the left.
        self.lent: deque[int] = deque()
        self.owner: _ZcDirection | None = None  # the direction writing to this socket
        self.small_sends = 0
        self.reap_ns = STAGE_NS + WRITE
        self._published = [0] * 7
        self._deadline = 0.0
        self.sender = ZeroCopySender(
            sock,
            max_outstanding_bytes=1 << 62,  # the pool bounds what is lent, not the sender
            on_release=self._released,
        )

    def _released(self, _data) -> None:
        owner = self.owner
        assert owner is not None, "a completion can only come for a send some direction made"
        owner.returned(self.lent.popleft())

    def add_reader(self, callback) -> None:
        self.reader = callback
        self.loop.add_reader(self.fd, callback)

    def remove_reader(self) -> None:
        self.reader = None
        self.loop.remove_reader(self.fd)
        self.watch_unattended()

    def add_writer(self, callback) -> None:
        self.writer = callback
        self.loop.add_writer(self.fd, callback)

    def remove_writer(self) -> None:
        self.writer = None
        self.loop.remove_writer(self.fd)
        self.watch_unattended()

    def service(self) -> None:
        """First thing in every callback on this socket: reap, and re-arm after a POLLERR."""
        sender = self.sender
        if sender.outstanding:
            relay = self.relay
            t0 = perf_counter_ns() if relay.timed else 0
            sender.reap()
            if t0:
                relay.block[self.reap_ns] += perf_counter_ns() - t0
        if sender.notifications != self.armed_at:
            # uvloop stopped this socket's poll handle when it saw POLLERR: register afresh.
            self.armed_at = sender.notifications
            loop, fd = self.loop, self.fd
            if self.reader is not None:
                loop.remove_reader(fd)
                loop.add_reader(fd, self.reader)
            if self.writer is not None:
                loop.remove_writer(fd)
                loop.add_writer(fd, self.writer)
            self.publish()

    def watch_unattended(self) -> None:
        """Completions outstanding and no callback to reap them: poll with a short timer."""
        if (
            self.timer is None
            and self.reader is None
            and self.writer is None
            and self.sender.outstanding
        ):
            self.timer = self.loop.call_later(REAP_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.timer = None
        try:
            self.service()
        except (OSError, RuntimeError):
            self.relay.reset_by(UPSTREAM if self.sock is self.relay.upstream else DOWNSTREAM)
            return
        self.publish()
        self.watch_unattended()

    def publish(self) -> None:
        """Add what changed since last time into the listener's shared ZC_* slots."""
        s = self.sender
        now = (
            s.zc_sends,
            s.plain_sends + self.small_sends,
            s.fallbacks,
            s.completed,
            s.copied,
            s.notifications,
            s.outstanding_bytes,
        )
        block, last = self.relay.block, self._published
        for i in range(7):
            if now[i] != last[i]:
                block[ZC_BASE + i] += now[i] - last[i]
                last[i] = now[i]

    # ---- close ---------------------------------------------------------------

    def close(self, reset: bool) -> None:
        """Close now if nothing is lent (or on reset); else linger until the kernel returns it all."""
        loop, fd = self.loop, self.fd
        self.reader = self.writer = None
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not reset and self.sender.outstanding:
            try:
                self.sender.reap()
            except (OSError, RuntimeError):
                reset = True
        if reset or not self.sender.outstanding:
            self._finish(reset)
            return
        # The peer sees the same FIN as a close; the descriptor stays to read the error queue.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._deadline = loop.time() + CLOSE_DRAIN_TIMEOUT
        self.timer = loop.call_later(REAP_INTERVAL, self._linger)

    def _linger(self) -> None:
        self.timer = None
        try:
            self.sender.reap()
        except (OSError, RuntimeError):
            self._finish(True)
            return
        if not self.sender.outstanding:
            self._finish(False)
        elif self.loop.time() >= self._deadline:
            self._finish(True)  # RST: the kernel drops what it still holds of our buffers
        else:
            self.timer = self.loop.call_later(REAP_INTERVAL, self._linger)

    def _finish(self, reset: bool) -> None:
        self.publish()
        if self._published[6]:
            # Abandoned by the reset: no longer lent as far as the gauge is concerned.
            self.relay.block[ZC_OUTSTANDING] -= self._published[6]
            self._published[6] = 0
        if reset:
            abort(self.sock)
        else:
            self.sock.close()


class _ZcDirection(_Direction):
    """One way of the relay with a pool of buffers; zero-copy sends when `dst` is a zerocopy socket."""

    __slots__ = (
        "src_ctl",
        "dst_ctl",
        "zc",
        "threshold",
        "size",
        "buf",
        "buffers",
        "views",
        "pins",
        "free",
        "cur",
        "starved",
    )

    def __init__(
        self,
        relay: ZeroCopyRelay,
        src: socket.socket,
        dst: socket.socket,
        buffer_size: int,
        src_side: str,
        app_side: str,
        src_ctl: _Plain,
        dst_ctl: _Plain,
        threshold: int,
    ) -> None:
        super().__init__(relay, src, dst, buffer_size, src_side, app_side)
        self.src_ctl, self.dst_ctl = src_ctl, dst_ctl
        self.zc = dst_ctl if isinstance(dst_ctl, _Watch) else None
        if self.zc is not None:
            self.zc.owner = self
            self.zc.reap_ns = self.write_ns
            self.threshold = threshold
            count = ZC_BUFFERS
        else:
            self.threshold = 1 << 62  # never: nothing to lend on a Unix socket
            count = 1
        # Lent buffers must stay put until reaped, so this backend does not share the worker's
        # pool; an idle connection still holds nothing until its first read.
        self.size = buffer_size
        self.buffers: list[bytearray | None] = [None] * count
        self.views: list[memoryview | None] = [None] * count
        self.buf: bytearray | None = None
        self.pins = [0] * count
        self.free = deque(range(1, count))
        self.cur = 0
        self.starved = False

    def on_readable(self) -> None:
        relay = self.relay
        try:
            self.src_ctl.service()
        except (OSError, RuntimeError):
            relay.reset_by(self.src_side)
            return
        if relay._closed or self.starved:
            return  # a POLLERR wake-up of a reader that is (about to be) off duty
        buf = self.buf
        if buf is None:
            buf = self._use(self.cur)
        t0 = perf_counter_ns() if relay.timed else 0
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
        sent = self._send(0, n)
        if sent < 0:
            return
        self._sent(sent, t2, False)
        if sent < n:
            # Destination is full: park the rest and stop reading until it drains.
            self.start, self.end = sent, n
            self.src_ctl.remove_reader()
            self.dst_ctl.add_writer(self.on_writable)
        elif self.pins[self.cur]:
            self._next_buffer()

    def on_writable(self) -> None:
        relay = self.relay
        try:
            self.dst_ctl.service()
        except (OSError, RuntimeError):
            relay.reset_by(self.dst_side)
            return
        if relay._closed or self.start == self.end:
            return
        t0 = perf_counter_ns() if relay.timed else 0
        sent = self._send(self.start, self.end)
        if sent < 0:
            return
        self._sent(sent, t0, True)
        self.start += sent
        if self.start == self.end:
            self.dst_ctl.remove_writer()
            if self.pins[self.cur]:
                self._next_buffer()
            if not self.starved:
                self.src_ctl.add_reader(self.on_readable)

    def _stop_reading(self) -> None:
        self.src_ctl.remove_reader()

    def _send(self, start: int, end: int) -> int:
        """Send view[start:end]: zero-copy (lending the buffer) at or above the threshold; -1 after a reset."""
        view = self.view
        assert view is not None, "sends come after a read into the current buffer"
        chunk = view[start:end]
        zc = self.zc
        try:
            if end - start < self.threshold:
                try:
                    sent = self.dst.send(chunk)
                except BlockingIOError:
                    return 0
                if zc is not None:
                    zc.small_sends += 1
                return sent
            assert zc is not None  # the small-send branch above returned when there is no watch
            cur = self.cur
            sender = zc.sender
            before = sender.zc_sends
            # Recorded before the call: send() may reap, and release, this very send.
            zc.lent.append(cur)
            self.pins[cur] += 1
            sent = sender.send(chunk)
            if sender.zc_sends == before:
                zc.lent.pop()
                self.pins[cur] -= 1
            elif zc.reader is None and zc.writer is None:
                zc.watch_unattended()
            return sent
        except (OSError, RuntimeError):
            self.relay.reset_by(self.dst_side)
            return -1

    def _next_buffer(self) -> None:
        """The current buffer is lent to the kernel: read into a free one, or stop reading."""
        if self.free:
            self._use(self.free.popleft())
        else:
            self.starved = True
            if not self.eof and self.start == self.end:
                self.src_ctl.remove_reader()

    def _use(self, slot: int) -> bytearray:
        self.cur = slot
        buf = self.buffers[slot]
        if buf is None:
            buf = self.buffers[slot] = bytearray(self.size)
            self.views[slot] = memoryview(buf)
        self.buf = buf
        self.view = self.views[slot]
        return buf

    def returned(self, slot: int) -> None:
        """The kernel finished with one send from buffer `slot` (called from reap)."""
        pins = self.pins
        pins[slot] -= 1
        if pins[slot] or slot == self.cur and not self.starved:
            return
        if slot != self.cur:
            self.free.append(slot)
        if self.starved:
            self.starved = False
            if pins[self.cur]:
                self._use(self.free.popleft())
            if not self.eof and not self.relay._closed and self.start == self.end:
                self.src_ctl.add_reader(self.on_readable)


class ZeroCopyRelay(Relay):
    """A TCP-mode connection whose TCP sockets are written with MSG_ZEROCOPY above a size threshold."""

    __slots__ = ("_ctl_down", "_ctl_up", "threshold")

    def __init__(self, *args, threshold: int, **kwargs) -> None:
        self.threshold = threshold
        super().__init__(*args, **kwargs)

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        down, up = self.downstream, self.upstream
        self._ctl_down = self._control(down)
        self._ctl_up = self._control(up)
        t = self.threshold
        ctl_down, ctl_up = self._ctl_down, self._ctl_up
        return (
            _ZcDirection(self, down, up, buffer_size, DOWNSTREAM, app_side, ctl_down, ctl_up, t),
            _ZcDirection(self, up, down, buffer_size, UPSTREAM, app_side, ctl_up, ctl_down, t),
        )

    def _control(self, sock: socket.socket) -> _Plain:
        if sock.family == socket.AF_UNIX:
            return _Plain(self.loop, sock)
        return _Watch(self, sock)

    def start(self) -> None:
        self._ctl_down.add_reader(self._request.on_readable)
        self._ctl_up.add_reader(self._response.on_readable)

    def _close_sockets(self, reset: bool) -> None:
        for ctl, sock in ((self._ctl_down, self.downstream), (self._ctl_up, self.upstream)):
            if isinstance(ctl, _Watch):
                ctl.close(reset)
                continue
            self.loop.remove_reader(ctl.fd)
            self.loop.remove_writer(ctl.fd)
            if reset:
                abort(sock)
            else:
                sock.close()
