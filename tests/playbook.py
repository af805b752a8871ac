"""Playbook tests: drive a listener's HTTP/1.1 machinery in-process with a script of events.

In the spirit of mitmproxy's proxy-core playbooks: a script says what the
client sends, what the upstream must receive byte for byte, what it answers,
what the client must receive, who closes and how much time passes. The proxy
side is the real thing — a ``Listener`` builds its HTTP context (router,
chain, pool, native lane) as it does in a worker, and a connection starts
where protocol detection hands HTTP/1.1 over — on a real event loop in this
process. Only the two ends are the test's: the client holds one end of a
socketpair whose other end the listener serves, and every upstream connect
(the context's ``connector`` seam) gets a fresh socketpair instead of a TCP
connect. Real file descriptors, so the native lane's C pair can take them.

The same script runs with ``express_lane: off`` (every request on the general
path) and ``express_lane: native`` (the C pair carries what it can); both must
give the same bytes and the same counters.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

from conftest import listener_block

from pyproxy import counters as c
from pyproxy.config import build_config
from pyproxy.eventloop import new_event_loop
from pyproxy.http.detect import HTTP1
from pyproxy.listener import Listener

LANES = ("off", "native")
WAIT = 2.0  # longest a step waits for bytes that must come (seconds)
SETTLE = 0.02  # how long "nothing more happens" is watched for


# ---- the events a script is made of --------------------------------------------------


@dataclass(frozen=True)
class ClientBytes:
    data: bytes


class ClientSends(ClientBytes):
    """The client writes these bytes."""


class ClientReceives(ClientBytes):
    """The next bytes the client reads are exactly these."""


@dataclass(frozen=True)
class ClientCloses:
    """``half``: shutdown(SHUT_WR), still reading; else the socket is closed."""

    half: bool = False


@dataclass(frozen=True)
class ClientSeesClose:
    """The proxy closed the client's connection, with nothing unread before it."""


@dataclass(frozen=True)
class UpstreamStep:
    """About upstream connection ``conn``: in connect order, -1 the latest."""

    conn: int = -1


@dataclass(frozen=True)
class UpstreamBytes:
    data: bytes
    conn: int = -1


class UpstreamReceives(UpstreamBytes):
    """The next bytes the upstream connection reads are exactly these."""


class UpstreamSends(UpstreamBytes):
    """The upstream connection writes these bytes."""


class UpstreamCloses(UpstreamStep):
    """The upstream side closes its socket."""


class UpstreamSeesClose(UpstreamStep):
    """The proxy closed the upstream connection, with nothing unread before it."""


@dataclass(frozen=True)
class ConnectFails:
    """The proxy's next upstream connect is refused (the connector reports "UF")."""


@dataclass(frozen=True)
class TimePasses:
    seconds: float


@dataclass(frozen=True)
class Nothing:
    """For a while, no end receives a byte and no connection closes."""

    seconds: float = SETTLE


@dataclass(frozen=True)
class Script:
    """A playbook: listener settings, the events, and what the counters read afterwards.

    ``listener`` entries are merged into the listener's YAML mapping (``http`` into its
    ``http``); ``counters`` is the expected snapshot (see ``Peer.snapshot``) minus the byte
    counts, which are checked against what the ends sent and read; ``native`` is how many
    requests the C pair carries on the native lane.
    """

    name: str
    steps: tuple
    counters: dict
    listener: dict = field(default_factory=dict)
    native: int = 0
    connects: int = 1


# ---- the two ends -------------------------------------------------------------------


class End:
    """The test's side of one socketpair: what arrived, and whether it closed."""

    def __init__(self, loop, sock: socket.socket, name: str) -> None:
        self.loop, self.sock, self.name = loop, sock, name
        sock.setblocking(False)
        self.received = bytearray()
        self.sent = self.read = 0
        self.closed_by_peer = False
        self.closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if data:
            self.received += data
            self.read += len(data)
        else:
            self.closed_by_peer = True
            self.loop.remove_reader(self.sock.fileno())

    def send(self, data: bytes) -> None:
        # Blocking, with the loop stopped: a script's sends fit in a socket buffer.
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)
        self.sent += len(data)

    def take(self, n: int) -> bytes:
        data = bytes(self.received[:n])
        del self.received[:n]
        return data

    def close(self, half: bool = False) -> None:
        if half:
            self.sock.shutdown(socket.SHUT_WR)
            return
        if not self.closed:
            self.closed = True
            if not self.closed_by_peer:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Peer:
    """One listener served in-process, one client connection to it, the upstreams it opens."""

    def __init__(self, lane: str, listener: dict | None = None) -> None:
        listener = dict(listener or {})
        http = {"express_lane": lane, **listener.pop("http", {})}
        doc = {
            "listeners": [
                {"name": "main", "mode": "http", "address": "127.0.0.1:1",
                 "upstream": "127.0.0.1:2", "http": http, **listener},
            ]
        }  # fmt: skip
        config = build_config(doc)
        self.loop = new_event_loop()
        self.block = listener_block()
        self.listener = Listener(self.loop, config.listeners[0], self.block, True, set(), config)
        http_ctx = self.listener.http
        assert http_ctx is not None
        http_ctx.connector = self._connect  # upstream connects become socketpairs
        self.upstreams: list[End] = []
        self.refuse_connects = 0
        client, served = socket.socketpair()
        served.setblocking(False)
        self.client = End(self.loop, client, "client")
        target = config.listeners[0].upstream
        self.listener.start_protocol(served, target, "", perf_counter_ns(), HTTP1)

    def _connect(self, loop, target, timeout, on_connected, on_failed, **accounts: Any):
        refused = self.refuse_connects > 0
        self.refuse_connects -= refused
        return PairConnect(self, on_connected, on_failed, refused)

    # ---- running the loop ------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def run_until(self, done, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {WAIT}s for {what}; {self.describe()}")
            self.run_for(0.001)

    def describe(self) -> str:
        ends = [self.client, *self.upstreams]
        return "; ".join(
            f"{end.name} holds {bytes(end.received)!r}{' (closed)' if end.closed_by_peer else ''}"
            for end in ends
        )

    def upstream(self, index: int) -> End:
        self.run_until(
            lambda: self.upstreams and len(self.upstreams) > index, "an upstream connect"
        )
        return self.upstreams[index]

    # ---- steps --------------------------------------------------------------------------

    def play(self, step) -> None:
        kind = type(step)
        if kind is ClientSends:
            self.client.send(step.data)
        elif kind is ClientReceives:
            self._receive(self.client, step.data)
        elif kind is ClientCloses:
            self.client.close(step.half)
        elif kind is ClientSeesClose:
            self._sees_close(self.client)
        elif kind is UpstreamReceives:
            self._receive(self.upstream(step.conn), step.data)
        elif kind is UpstreamSends:
            self.upstream(step.conn).send(step.data)
        elif kind is UpstreamCloses:
            self.upstream(step.conn).close()
        elif kind is UpstreamSeesClose:
            self._sees_close(self.upstream(step.conn))
        elif kind is ConnectFails:
            self.refuse_connects += 1
        elif kind is TimePasses:
            self.run_for(step.seconds)
        elif kind is Nothing:
            before = self._state()
            self.run_for(step.seconds)
            assert self._state() == before, f"something happened: {self.describe()}"
        else:
            raise TypeError(f"not a playbook step: {step!r}")

    def _state(self) -> tuple:
        return tuple(
            (len(end.received), end.closed_by_peer) for end in [self.client, *self.upstreams]
        )

    def _receive(self, end: End, data: bytes) -> None:
        self.run_until(
            lambda: len(end.received) >= len(data) or end.closed_by_peer,
            f"{len(data)} bytes at the {end.name}",
        )
        got = end.take(len(data))
        assert got == data, f"{end.name} received {got!r}, expected {data!r}"

    def _sees_close(self, end: End) -> None:
        self.run_until(lambda: end.closed_by_peer or bool(end.received), f"{end.name} closed")
        assert not end.received, f"{end.name} received {bytes(end.received)!r} before the close"

    def finish(self) -> None:
        """Every byte that arrived was claimed by a step; then both ends close, and the proxy
        lets go of everything it held."""
        self.play(Nothing())
        leftover = [end.name for end in [self.client, *self.upstreams] if end.received]
        assert not leftover, f"unclaimed bytes: {self.describe()}"
        for end in [self.client, *self.upstreams]:
            end.close()
        self.run_for(SETTLE)

    def close(self) -> None:
        for end in [self.client, *self.upstreams]:
            end.close()
        http_ctx = self.listener.http
        if http_ctx is not None:
            http_ctx.close()
        for conn in list(self.listener.connections):
            conn.close("LR")
        self.run_for(0)
        self.loop.close()

    # ---- what the listener counted ----------------------------------------------------

    def snapshot(self) -> dict:
        """The counters both lanes must agree on."""
        block = self.block
        statuses = {f"{i + 1}xx": block[c.STATUS_BASE + i] for i in range(5)}
        return {
            "requests": block[c.REQUESTS],
            "responses": {name: n for name, n in statuses.items() if n},
            "flags": {flag: block[c.FLAG_BASE + i] for i, flag in enumerate(c.FLAGS) if block[c.FLAG_BASE + i]},
            "rejected": {r: block[c.REJECT_BASE + i] for i, r in enumerate(c.REJECTS) if block[c.REJECT_BASE + i]},
            "durations": block[c.HIST_COUNT],
            "bytes": {
                "downstream_rx": block[c.DOWNSTREAM_RX],
                "downstream_tx": block[c.DOWNSTREAM_TX],
                "upstream_rx": block[c.UPSTREAM_RX],
                "upstream_tx": block[c.UPSTREAM_TX],
            },
        }  # fmt: skip


class PairConnect:
    """An upstream connect that ends on the next loop turn, like a connect to a local port:
    the proxy gets one end of a new socketpair, the script the other (``Peer.upstreams``, in
    connect order); or, refused, it fails with "UF" as a refused TCP connect does."""

    def __init__(self, peer: Peer, on_connected, on_failed, refused: bool) -> None:
        self._sock: socket.socket | None = None
        if refused:
            self._handle: Any = peer.loop.call_soon(self._done, on_failed, "UF")
            return
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        peer.upstreams.append(End(peer.loop, ours, f"upstream {len(peer.upstreams)}"))
        self._sock = theirs
        self._handle = peer.loop.call_soon(self._done, on_connected, theirs)

    def _done(self, callback, arg) -> None:
        self._handle = None
        callback(arg)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            if self._sock is not None:
                self._sock.close()


@dataclass
class Outcome:
    counters: dict
    native: int
    connects: int


def play(script: Script, lane: str) -> Outcome:
    """Run every step on a fresh listener; the counters and how the requests went."""
    peer = Peer(lane, script.listener)
    try:
        for step in script.steps:
            peer.play(step)
        peer.finish()
        counters = peer.snapshot()
        # What the proxy counted on the wire is what the ends sent and read.
        upstream_sent = sum(end.sent for end in peer.upstreams)
        upstream_read = sum(end.read for end in peer.upstreams)
        assert counters["bytes"] == {
            "downstream_rx": peer.client.sent, "downstream_tx": peer.client.read,
            "upstream_rx": upstream_sent, "upstream_tx": upstream_read,
        }, counters  # fmt: skip
        return Outcome(counters, peer.block[c.NATIVE_REQUESTS], len(peer.upstreams))
    finally:
        peer.close()
