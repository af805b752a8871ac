"""A byte stream for L7 modes: timed recv handed to a protocol, timed buffered sends, flow control.

The TCP relay moves bytes buffer-to-socket itself; HTTP and gRPC need the
bytes handed to a codec and the codec's output sent, possibly from several
places. A Stream owns one non-blocking socket, times every syscall into the
listener's stage block exactly like the relay does, queues what the kernel
does not take, and tells its owner when the queue crosses the high/low
watermarks so backpressure can travel to the other side of the proxy.
"""

from __future__ import annotations

import socket
from collections import deque
from time import perf_counter_ns
from typing import Protocol

from pyproxy.counters import NOTIFY, OTHER, STAGE_EVENTS, STAGE_NS, STAGES
from pyproxy.io.sockets import abort

NOTIFY_EVENTS = STAGE_EVENTS + NOTIFY
OTHER_NS = STAGE_NS + OTHER
READ_SIZE = 65536
# How long a closed stream may wait for a peer to take its last bytes: one that never reads
# must not keep the socket (and the loop's watch on it) after its owner has let go.
CLOSE_LINGER_S = 10.0
# How long a gracefully closed socket whose peer may still be sending reads and discards before
# it closes: closing with unread bytes makes the kernel send an RST, which can destroy a final
# answer (a 413 while the client still uploads) before the client reads it.
DISCARD_S = 2.0


class StreamOwner(Protocol):
    """What a Stream reports to the session that owns it."""

    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> None: ...
    def stream_failed(self, error: OSError) -> None: ...
    def write_paused(self) -> None: ...
    def write_resumed(self) -> None: ...


class Stream:
    __slots__ = (
        "loop",
        "sock",
        "fd",
        "block",
        "timed",
        "owner",
        "read_ns",
        "read_events",
        "write_ns",
        "write_events",
        "rx",
        "tx",
        "_queue",
        "_queued",
        "_reading",
        "_reader_armed",
        "_corked",
        "_cork",
        "claim_end",
        "_writer_armed",
        "_write_paused",
        "_shutdown_pending",
        "_close_pending",
        "_linger",
        "_eof",
        "closed",
        "high_water",
        "low_water",
        "bytes_in",
        "bytes_out",
        "read_stage",
        "write_stage",
        "trace",
    )

    def __init__(
        self,
        loop,
        sock: socket.socket,
        block: memoryview,
        owner: StreamOwner,
        *,
        timed: bool,
        read_stage: int,
        write_stage: int,
        rx_slot: int,
        tx_slot: int,
        high_water: int = 256 * 1024,
        claim_end: int = STAGE_NS + len(STAGES),
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.block = block
        self.timed = timed
        self.owner = owner
        self.read_ns, self.read_events = STAGE_NS + read_stage, STAGE_EVENTS + read_stage
        self.write_ns, self.write_events = STAGE_NS + write_stage, STAGE_EVENTS + write_stage
        self.rx, self.tx = rx_slot, tx_slot
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._reading = False
        self._reader_armed = False  # whether the loop watches the fd (pausing is lazy, see below)
        self._corked = False
        self._cork: list = []
        # `other` subtracts the stage slots [STAGE_NS, claim_end) touched inside a callback.
        self.claim_end = claim_end
        self._writer_armed = False
        self._write_paused = False
        self._shutdown_pending = False
        self._close_pending = False
        self._linger = None
        self._eof = False
        self.closed = False
        self.high_water = high_water
        self.low_water = high_water // 4
        self.bytes_in = self.bytes_out = 0
        self.read_stage, self.write_stage = read_stage, write_stage
        # Per-request stage totals (Server-Timing, access log), set by the exchange when wanted.
        self.trace: list[int] | None = None

    # ---- reading ---------------------------------------------------------------

    def resume_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            if not self._reader_armed:
                self._reader_armed = True
                self.loop.add_reader(self.fd, self._on_readable)

    def pause_reading(self) -> None:
        # Lazy: the fd stays watched; if data arrives while paused, the callback un-watches it then.
        # Pauses are mostly short (an upstream picked from the pool, a flush), and each real
        # remove/add costs several syscalls in the event loop.
        self._reading = False

    def _unwatch(self) -> None:
        if self._reader_armed:
            self._reader_armed = False
            if not self.closed:
                self.loop.remove_reader(self.fd)

    def lend(self, on_readable) -> None:
        """Let another reader (the native express lane) watch the fd until ``take_back``."""
        self._unwatch()
        self.loop.add_reader(self.fd, on_readable)

    def take_back(self, bytes_in: int, bytes_out: int) -> None:
        """Watch the fd again; the borrower moved these bytes (already in the listener's counts)."""
        self.loop.remove_reader(self.fd)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if self._reading:
            self._reader_armed = True
            self.loop.add_reader(self.fd, self._on_readable)

    @property
    def reading(self) -> bool:
        return self._reading

    def _on_readable(self) -> None:
        if not self._reading:
            self._unwatch()
            return
        timed = self.timed
        if timed:
            t0 = perf_counter_ns()
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(exc)
            return
        block = self.block
        if timed:
            t1 = perf_counter_ns()
            block[self.read_ns] += t1 - t0
            block[self.read_events] += 1
            block[NOTIFY_EVENTS] += 1
            if self.trace is not None:
                self.trace[self.read_stage] += t1 - t0
        if not data:
            self._reading = False
            self._eof = True
            self._unwatch()
            self.owner.eof_received()
            return
        n = len(data)
        block[self.rx] += n
        self.bytes_in += n
        if not timed:
            self.owner.data_received(data)
            return
        # `other` is this callback's time not claimed by a timed stage (syscalls, parse, filters).
        end = self.claim_end
        claimed = sum(block[STAGE_NS:end])
        self.owner.data_received(data)
        block[OTHER_NS] += perf_counter_ns() - t1 - (sum(block[STAGE_NS:end]) - claimed)

    # ---- writing ---------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return self._queued

    def cork(self) -> None:
        """Collect writes until uncork(): one send for a head, its body and its end."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        pending = self._cork
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.write(data)
        if self._close_pending and not self._queue:
            self.close()

    def write(self, data) -> None:
        """Send now what the kernel takes; queue the rest (the owner hears about the watermarks)."""
        if self.closed or not data:
            return
        if self._corked:
            self._cork.append(data)
            return
        if not self._queue:
            sent = self._send(data)
            if sent is None:
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._queue.append(memoryview(data))
        self._queued += len(data)
        if not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self.fd, self._on_writable)
        if not self._write_paused and self._queued > self.high_water:
            self._write_paused = True
            self.owner.write_paused()

    def _send(self, data) -> int | None:
        timed = self.timed
        if timed:
            t0 = perf_counter_ns()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failed(exc)
            return None
        if timed:
            elapsed = perf_counter_ns() - t0
            block = self.block
            block[self.write_ns] += elapsed
            block[self.write_events] += 1
            if self.trace is not None:
                self.trace[self.write_stage] += elapsed
        self.block[self.tx] += sent
        self.bytes_out += sent
        return sent

    def _on_writable(self) -> None:
        if self.timed:
            self.block[NOTIFY_EVENTS] += 1
        queue = self._queue
        while queue:
            head = queue[0]
            sent = self._send(head)
            if sent is None:
                return
            self._queued -= sent
            if sent < len(head):
                queue[0] = head[sent:]
                return
            queue.popleft()
        self._writer_armed = False
        self.loop.remove_writer(self.fd)
        if self._close_pending:
            self.close()
            return
        if self._shutdown_pending:
            self._shutdown_now()
        if self._write_paused and self._queued <= self.low_water:
            self._write_paused = False
            self.owner.write_resumed()

    def shutdown_write(self) -> None:
        """Half-close once everything queued has been sent."""
        if self._queue:
            self._shutdown_pending = True
        else:
            self._shutdown_now()

    def _shutdown_now(self) -> None:
        self._shutdown_pending = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # ---- closing ---------------------------------------------------------------

    def _failed(self, error: OSError) -> None:
        if self._close_pending:
            # The owner closed already and hears nothing more: the socket is ours to close. Left
            # to the garbage collector, its fd number would go back to the kernel while the event
            # loop still holds its (closed) watch, and the next socket given that number could
            # not be watched.
            self.close(reset=True)
            return
        self.owner.stream_failed(error)

    def close(self, reset: bool = False, after_flush: bool = False) -> None:
        """Close now (``reset``: with an RST), or with ``after_flush`` once queued bytes are out."""
        if after_flush and not reset:
            self.close_after_flush()
            return
        if self.closed:
            return
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self._reading = self._writer_armed = self._reader_armed = False
        self._queue.clear()
        if reset:
            abort(self.sock)
        elif self._eof or self.fd < 0:
            self.sock.close()
        else:
            _Discard(self.loop, self.sock)

    def detach(self) -> tuple[socket.socket, bytes]:
        """Give the socket away (e.g. to a byte relay after an Upgrade) with what is still unsent."""
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._reading = self._writer_armed = self._reader_armed = False
        unsent = b"".join(self._cork) + b"".join(self._queue)
        self._cork.clear()
        self._queue.clear()
        return self.sock, unsent

    def close_after_flush(self) -> None:
        """Close gracefully once queued bytes are out (e.g. after a final local reply)."""
        self.pause_reading()
        if not self._queue and not self._cork:
            self.close()
        elif not self._close_pending:
            self._close_pending = True
            self._linger = self.loop.call_later(CLOSE_LINGER_S, self.close, True)


class _Discard:
    """A closed stream's socket whose peer has not ended: half-closed at once (the peer sees the
    end of what was sent), then read and discarded until the peer ends or DISCARD_S pass."""

    __slots__ = ("loop", "sock", "fd", "timer")

    def __init__(self, loop, sock: socket.socket) -> None:
        self.loop, self.sock, self.fd = loop, sock, sock.fileno()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        loop.add_reader(self.fd, self._drain)
        self.timer = loop.call_later(DISCARD_S, self._close)

    def _drain(self) -> None:
        try:
            for _ in range(16):  # a bounded turn: a peer that keeps sending waits for the next
                if not self.sock.recv(READ_SIZE):
                    break
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.timer.cancel()
        self._close()

    def _close(self) -> None:
        self.loop.remove_reader(self.fd)
        self.sock.close()
