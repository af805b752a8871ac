"""Reading an accepted connection's first bytes until a decision names its protocol.

The decision (pyproxy/http/detect.py) sees bytes only; this reader owns the socket, the
timer and the metering. It reads rather than peeks, so an incomplete prefix cannot spin
the loop, and hands on every byte it read, in order.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from time import perf_counter_ns
from typing import Protocol

from pyproxy.counters import DOWNSTREAM_RX, NOTIFY, STAGE_EVENTS, STAGE_NS

READ_SIZE = 16384
TIMED_OUT = "DT"  # the response flag of a connection whose first bytes came too late


class Decision(Protocol):
    """What the bytes read so far say: a protocol name, or None (more bytes; at the end: drop)."""

    timeout: float

    def on_bytes(self, data: bytes) -> str | None: ...

    def on_eof(self, data: bytes) -> str | None: ...

    def on_timeout(self) -> str | None: ...


class FirstBytes:
    """One accepted connection whose protocol is not known yet; closable by drain like a session.

    `on_decided(reader, protocol, flag)` runs once: protocol None means close the connection
    (counted under `flag` when there is one); `reader.data` is every byte read.
    """

    __slots__ = (
        "loop",
        "sock",
        "fd",
        "block",
        "timed",
        "read_ns",
        "read_events",
        "decision",
        "on_decided",
        "data",
        "timer",
        "done",
    )

    def __init__(
        self,
        loop,
        sock: socket.socket,
        block: memoryview,
        timed: bool,
        read_stage: int,
        decision: Decision,
        on_decided: Callable[[FirstBytes, str | None, str], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.block = block
        self.timed = timed
        self.read_ns, self.read_events = STAGE_NS + read_stage, STAGE_EVENTS + read_stage
        self.decision = decision
        self.on_decided = on_decided
        self.data = b""
        self.timer = None
        self.done = False

    def start(self) -> None:
        self.timer = self.loop.call_later(self.decision.timeout, self._timed_out)
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        block = self.block
        t0 = perf_counter_ns()
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._decide(None)
            return
        if self.timed:
            block[self.read_ns] += perf_counter_ns() - t0
            block[self.read_events] += 1
            block[STAGE_EVENTS + NOTIFY] += 1
        if not data:
            self._decide(self.decision.on_eof(self.data))
            return
        block[DOWNSTREAM_RX] += len(data)
        self.data += data
        protocol = self.decision.on_bytes(self.data)
        if protocol is not None:
            self._decide(protocol)

    def _timed_out(self) -> None:
        self.timer = None
        if not self.done:
            self._decide(self.decision.on_timeout(), TIMED_OUT)

    def _decide(self, protocol: str | None, flag: str = "") -> None:
        self.done = True
        self.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.on_decided(self, protocol, flag)

    def close(self, flag: str = "LR") -> None:
        if not self.done:
            self._decide(None, flag)
