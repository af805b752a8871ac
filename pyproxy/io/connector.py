"""Non-blocking upstream connects with a timeout, timed into the stage of the side they face."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from pyproxy.addresses import Address
from pyproxy.io import sockets

IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN)


class Connect:
    """One connect attempt: exactly one of on_connected(sock) / on_failed(flag) is called, once.

    Failure flags: "UF" for refused/unreachable/timed out. Cancelling calls neither.
    """

    __slots__ = (
        "loop",
        "sock",
        "_timer",
        "_on_connected",
        "_on_failed",
        "_spent",
        "_block",
        "_stage_ns",
        "_stage_events",
        "_done",
    )

    def __init__(
        self,
        loop,
        target: Address,
        timeout: float,
        on_connected: Callable[[socket.socket], None],
        on_failed: Callable[[str], None],
        *,
        source_host: str = "",
        block: memoryview | None = None,
        stage_ns: int = 0,
        stage_events: int = 0,
    ) -> None:
        self.loop = loop
        self._on_connected, self._on_failed = on_connected, on_failed
        self._block = block
        self._stage_ns, self._stage_events = stage_ns, stage_events
        self._done = False
        self._timer = None
        self.sock: Any = None  # the socket once created (None if socket() itself failed)
        # Only the syscalls count toward the stage (socket+connect now, SO_ERROR later), never
        # the wait for the handshake: that is time the loop spends on other work.
        started = perf_counter_ns()
        try:
            self.sock, code = sockets.connect_nonblocking(target, source_host)
        except OSError:
            self.sock = None
            loop.call_soon(self._fail)
            return
        finally:
            self._spent = perf_counter_ns() - started
        if code == 0:
            loop.call_soon(self._succeed)
        elif code in IN_PROGRESS:
            self._timer = loop.call_later(timeout, self._fail)
            loop.add_writer(self.sock.fileno(), self._on_writable)
        else:
            loop.call_soon(self._fail)

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        started = perf_counter_ns()
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._spent += perf_counter_ns() - started
        if code:
            self._fail()
        else:
            self._succeed()

    def _finish(self) -> bool:
        if self._done:
            return False
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        if self._block is not None:
            self._block[self._stage_ns] += self._spent
            self._block[self._stage_events] += 1
        return True

    def _succeed(self) -> None:
        if self._finish():
            self._on_connected(self.sock)

    def _fail(self) -> None:
        if self._finish():
            self._close_sock()
            self._on_failed("UF")

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
            self._close_sock()

    def _close_sock(self) -> None:
        if self.sock is not None:
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_writer(fd)
            self.sock.close()
