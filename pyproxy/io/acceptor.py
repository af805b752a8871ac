"""The accept loop: a listener's listening sockets, accept(2) in bounded batches, timed.

What happens to an accepted connection (admission aside) is the listener's business: the
acceptor hands it over ready for the data path (non-blocking, Nagle off on TCP).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from time import perf_counter_ns

from pyproxy.addresses import Address
from pyproxy.counters import REFUSED_CONNECTIONS, STAGE_EVENTS, STAGE_NS
from pyproxy.io import sockets

log = logging.getLogger("pyproxy.listener")

ACCEPTS_PER_WAKEUP = 64  # bounded so one busy listener cannot starve the rest of the loop


class Acceptor:
    """Accepts on every address of one listener; `on_accepted` gets each admitted connection."""

    def __init__(
        self,
        loop,
        name: str,
        block: memoryview,
        timed: bool,
        admit: Callable[[], bool],
        on_accepted: Callable[[socket.socket], None],
    ) -> None:
        self.loop = loop
        self.name = name
        self.block = block
        self.timed = timed
        self.admit = admit
        self.on_accepted = on_accepted
        self.sockets: list[socket.socket] = []
        self.stage_ns = self.stage_events = 0

    def set_stage(self, stage: int) -> None:
        """Which stage accept(2) counts as: ipc when the app is the downstream, else read."""
        self.stage_ns, self.stage_events = STAGE_NS + stage, STAGE_EVENTS + stage

    def listen(self, addresses: tuple[Address, ...], transparent: bool) -> None:
        for address in addresses:
            sock = sockets.listen(address, transparent=transparent)
            self.sockets.append(sock)
            self.loop.add_reader(sock.fileno(), self._on_acceptable, sock)

    def stop(self) -> None:
        """Stop watching; connections the kernel completed already are clients we answer
        (closing the listening socket would reset them): hand them over now."""
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            while True:
                try:
                    conn, _peer = sock.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                _prepare(conn)
                self.on_accepted(conn)

    def close(self) -> None:
        """Close the listening sockets (after `stop`); a Unix socket's file goes with it."""
        for sock in self.sockets:
            if sock.family == socket.AF_UNIX:
                path = sock.getsockname()
                sock.close()
                _unlink_quietly(path)
            else:
                sock.close()
        self.sockets.clear()

    def _on_acceptable(self, lsock: socket.socket) -> None:
        timed = self.timed
        block = self.block
        for _ in range(ACCEPTS_PER_WAKEUP):
            if timed:
                t0 = perf_counter_ns()
            try:
                conn, _peer = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: keep the listener; the backlog waits for resources.
                log.warning("accept on %s failed: %s", self.name, exc)
                return
            if timed:
                block[self.stage_ns] += perf_counter_ns() - t0
                block[self.stage_events] += 1
            if not self.admit():
                # Over the worker's limit: a reset now, so the client neither waits nor retries here.
                block[REFUSED_CONNECTIONS] += 1
                sockets.abort(conn)
                continue
            _prepare(conn)
            self.on_accepted(conn)


def _prepare(conn: socket.socket) -> None:
    conn.setblocking(False)
    if conn.family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
