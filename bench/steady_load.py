"""A bounded, steady HTTP/1.1 load that counts every request: sent, answered, refused, lost.

Each client keeps one connection alive and sends one request at a time: a
POST (not idempotent, so nothing may retry it) whose path carries a unique
id, ``/r/<client>-<n>``. The response must be Content-Length framed and, for
a 200, name that id (an upstream echoing its path, e.g. ``ok:/r/3-17:…``),
so a response given to the wrong request is caught. A client reconnects when
the proxy asks (``Connection: close``) or closes between responses. Every
request ends as exactly one of:

* answered: a whole response came back (counted by status);
* lost: it was sent and the connection ended before a whole response came
  back. Lost requests are never re-sent: whether the app ran one is for the
  caller to check against what the app saw.

A connect that fails sends nothing; it is counted as ``refused`` and tried
again a little later (a draining proxy refuses new connections). With
``rate`` the clients share that many requests per second between them,
paced; with 0 they go as fast as the proxy answers.

Used by tests/test_lose_nothing.py (in a thread) and bench/soak.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pyproxy.eventloop import new_event_loop

RECONNECT_PAUSE = 0.01  # after a refused connect
CATCH_UP = 0.5  # seconds


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    refused: int = 0  # connects that failed (nothing sent)
    lost: int = 0
    wrong: int = 0  # a 200 naming another request's id
    statuses: Counter = field(default_factory=Counter)
    lost_ids: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, id)
    answered_ids: set[str] = field(default_factory=set)

    def copy(self) -> Counts:
        return Counts(
            self.sent,
            self.answered,
            self.refused,
            self.lost,
            self.wrong,
            Counter(self.statuses),
            list(self.lost_ids),
            set(self.answered_ids),
        )


class SteadyLoad:
    """``start()`` runs the clients on an event loop in a thread; ``stop()`` lets each finish its
    request in flight and returns the counts."""

    def __init__(
        self,
        port: int,
        clients: int = 8,
        rate: float = 0.0,
        body: bytes = b"x" * 64,
        keep_ids: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.host, self.port = host, port
        self.clients = clients
        self.interval = clients / rate if rate else 0.0
        self.body = body
        self.keep_ids = keep_ids  # off for long soaks: the id sets would grow with the run
        self.counts = Counts()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> SteadyLoad:
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> Counts:
        self._stopping = True
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load clients did not finish their last requests"
        return self.counts

    def _run(self) -> None:
        loop = new_event_loop()
        try:
            loop.run_until_complete(self._all_clients())
        finally:
            loop.close()

    async def _all_clients(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    async def _client(self, index: int) -> None:
        counts = self.counts
        head = b"POST /r/%d-%%d HTTP/1.1\r\nHost: load\r\nContent-Length: %d\r\n\r\n" % (
            index,
            len(self.body),
        )
        writer = reader = None
        n = 0
        next_at = time.monotonic() + self.interval * index / self.clients
        while not self._stopping:
            if self.interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # A client held up by a slow response catches up on at most CATCH_UP of slots.
                next_at = max(next_at + self.interval, time.monotonic() - CATCH_UP)
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                except OSError:
                    counts.refused += 1
                    await asyncio.sleep(RECONNECT_PAUSE)
                    continue
            assert reader is not None
            n += 1
            rid = b"%d-%d" % (index, n)
            counts.sent += 1
            try:
                writer.write(head % n + self.body)
                status, close, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counts.lost += 1
                counts.lost_ids.append((time.monotonic(), rid.decode()))
                writer.close()
                writer = None
                continue
            counts.answered += 1
            counts.statuses[status] += 1
            if status == 200 and b"/r/" + rid + b":" not in body:
                counts.wrong += 1
            if self.keep_ids:
                counts.answered_ids.add(rid.decode())
            if close:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, the proxy asked to close, body) of one Content-Length framed response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    body = await reader.readexactly(length) if length else b""
    return status, close, body
