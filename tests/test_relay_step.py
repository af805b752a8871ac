"""The relay step that runs whole in C: same bytes, same accounts, same half-close and reset as the Python relay.

In-process, over real loopback TCP sockets and the proxy's own event loop
(uvloop when installed): a client thread and a server thread on the outer
sockets, the relay between the inner ones.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from time import perf_counter_ns

import pytest
from byte_streams import Sink, payload_chunks, send_payload, tcp_pair

from pyproxy import native
from pyproxy.counters import (
    DOWNSTREAM_RX,
    DOWNSTREAM_TX,
    FLAG_BASE,
    FLAG_INDEX,
    IPC,
    LISTENER_SLOTS,
    MESSAGES,
    NOTIFY,
    OTHER,
    READ,
    STAGE_EVENTS,
    STAGE_NS,
    UPSTREAM_RX,
    UPSTREAM_TX,
    WRITE,
)
from pyproxy.eventloop import new_event_loop
from pyproxy.io.relay import Relay

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

MB = 1024 * 1024


def _relay_classes() -> dict[str, type]:
    from pyproxy.io.relay_step import NativeCopyRelay  # lazy: needs the native module
    from pyproxy.io.splice_relay import SpliceRelay  # lazy: needs the native module

    return {"python": Relay, "native-copy": NativeCopyRelay, "splice": SpliceRelay}


class Harness:
    """client <-> [downstream | relay | upstream] <-> server, the relay on a real event loop."""

    def __init__(self, relay_class: type, timed: bool = True, loop=None, start: bool = True):
        self.own_loop = loop is None
        self.loop = new_event_loop() if loop is None else loop
        self.block = memoryview(bytearray(LISTENER_SLOTS * 8)).cast("q")
        self.client, self.downstream = tcp_pair()
        self.upstream, self.server = tcp_pair()
        for sock in (self.downstream, self.upstream, self.client, self.server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.downstream.setblocking(False)
        self.upstream.setblocking(False)
        self.closed: list[str] = []
        self.relay = relay_class(
            self.loop, self.downstream, self.upstream, self.block, timed=timed,
            app_side="upstream", buffer_size=65536, idle_timeout=0.0,
            started_ns=perf_counter_ns(), on_close=lambda relay: self.closed.append(relay.flag),
        )  # fmt: skip
        if start:
            self.relay.start()

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        async def wait() -> None:
            import asyncio  # lazy: only the harness's waiting needs it

            deadline = time.monotonic() + timeout
            while not done():
                if time.monotonic() > deadline:
                    raise AssertionError("timed out")
                await asyncio.sleep(0.002)

        self.loop.run_until_complete(wait())

    def close(self) -> None:
        self.relay.close()
        for sock in (self.client, self.server):
            sock.close()
        if self.own_loop:
            self.loop.close()


@pytest.fixture(params=["native-copy", "splice"])
def native_class(request) -> type:
    return _relay_classes()[request.param]


def _lockstep(harness: Harness, rounds: int, size: int) -> None:
    """The client sends `size` bytes, the server echoes them, `rounds` times, one at a time."""
    errors: list[BaseException] = []

    def echo() -> None:
        try:
            for _ in range(rounds):
                got = b""
                while len(got) < size:
                    got += harness.server.recv(size - len(got))
                harness.server.sendall(got)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    replies: list[bytes] = []

    def client() -> None:
        for i in range(rounds):
            harness.client.sendall(bytes([i % 251]) * size)
            got = b""
            while len(got) < size:
                got += harness.client.recv(size - len(got))
            replies.append(got)

    driver = threading.Thread(target=client, daemon=True)
    driver.start()
    harness.run_until(lambda: len(replies) == rounds)
    driver.join(5)
    thread.join(5)
    assert not errors
    assert replies == [bytes([i % 251]) * size for i in range(rounds)]


def test_native_step_keeps_the_same_accounts_as_the_python_relay():
    """Lockstep messages: every count the Python relay keeps, the C step keeps alike."""
    slots = [DOWNSTREAM_RX, DOWNSTREAM_TX, UPSTREAM_RX, UPSTREAM_TX, MESSAGES]
    slots += [STAGE_EVENTS + stage for stage in (IPC, READ, WRITE, NOTIFY)]
    counts = {}
    for name, cls in _relay_classes().items():
        harness = Harness(cls)
        try:
            _lockstep(harness, rounds=50, size=100)
            counts[name] = [harness.block[slot] for slot in slots]
            for stage in (IPC, READ, WRITE):  # each stage's time was taken, not counted
                assert harness.block[STAGE_NS + stage] > 0, (name, stage)
            # Python's own work between the calls is timed; the C step's few adds are not.
            assert (harness.block[STAGE_NS + OTHER] > 0) is (name == "python"), name
        finally:
            harness.close()
    assert counts["python"][:5] == [5000, 5000, 5000, 5000, 50]
    assert counts["native-copy"] == counts["python"]
    assert counts["splice"] == counts["python"]


def test_stage_clock_off_counts_bytes_but_takes_no_time(native_class):
    harness = Harness(native_class, timed=False)
    try:
        _lockstep(harness, rounds=10, size=100)
        assert harness.block[DOWNSTREAM_RX] == harness.block[UPSTREAM_TX] == 1000
        assert harness.block[MESSAGES] == 10
        assert all(harness.block[STAGE_NS + s] == 0 for s in (IPC, READ, WRITE))
    finally:
        harness.close()


def test_half_close_travels_and_the_reply_still_flows(native_class):
    harness = Harness(native_class)
    try:
        request = b"q" * (3 * MB)
        reply_total = 5 * MB
        server_got = Sink(harness.server)
        server_got.start()
        harness.client.sendall(request)
        harness.client.shutdown(socket.SHUT_WR)
        harness.run_until(lambda: server_got.eof)  # the client's FIN reached the server
        assert server_got.count == len(request)
        assert server_got.hash.hexdigest() == hashlib.sha256(request).hexdigest()
        client_got = Sink(harness.client)
        client_got.start()
        sender = threading.Thread(
            target=lambda: (send_payload(harness.server, reply_total, 5), harness.server.close()),
            daemon=True,
        )
        sender.start()
        harness.run_until(lambda: client_got.eof)
        expected = hashlib.sha256()
        for chunk in payload_chunks(reply_total, 5):
            expected.update(chunk)
        assert (client_got.count, client_got.hash.hexdigest()) == (
            reply_total,
            expected.hexdigest(),
        )
        harness.run_until(lambda: bool(harness.closed))
        assert harness.closed == [""]  # both directions ended cleanly: no flag
    finally:
        harness.close()


def test_upstream_reset_reaches_the_client_as_a_reset(native_class):
    harness = Harness(native_class)
    try:
        _lockstep(harness, rounds=3, size=100)
        harness.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        harness.server.close()
        harness.run_until(lambda: bool(harness.closed))
        assert harness.closed == ["UR"]
        assert harness.block[FLAG_BASE + FLAG_INDEX["UR"]] == 1
        harness.client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while harness.client.recv(65536):
                pass
    finally:
        harness.close()


def test_a_write_to_a_reset_destination_resets_the_source(native_class):
    harness = Harness(native_class)
    try:
        harness.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        harness.server.close()
        time.sleep(0.05)
        # The relay may see the upstream's RST as readable EOF/reset or as a failed write;
        # either way the client is reset and the flag is the upstream's.
        try:
            harness.client.sendall(b"x" * MB)
        except OSError as exc:
            assert exc.errno in (errno.ECONNRESET, errno.EPIPE)
        harness.run_until(lambda: bool(harness.closed))
        assert harness.closed == ["UR"]
    finally:
        harness.close()


def test_after_a_failed_write_the_next_connection_gets_only_its_own_bytes(native_class):
    """A read whose write fails leaves its bytes in the shared buffer or pipe; they must never
    reach the next connection (a pipe keeps them: it is taken out of the pool and closed)."""
    failed = Harness(native_class, start=False)
    try:
        failed.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        failed.server.close()
        failed.client.sendall(b"stale" * 1000)
        time.sleep(0.05)
        failed.relay._request.on_readable()  # read from the client, write to the reset upstream
        assert failed.closed == ["UR"]
    finally:
        failed.close()
    fresh = Harness(native_class)
    try:
        _lockstep(fresh, rounds=5, size=1000)
    finally:
        fresh.close()


def test_a_parked_direction_never_shares_its_buffer_with_a_flowing_one(native_class):
    """One connection's destination stalls (its rest is parked), drains, then another's stalls:
    every byte of both arrives exactly (the shared read buffer/pipe must always be a free one)."""
    a = Harness(native_class)
    b = Harness(native_class, loop=a.loop)  # one loop: the process's buffers or pipes are shared
    total = 24 * MB
    try:
        senders = [
            threading.Thread(target=send_payload, args=(h.client, total, seed), daemon=True)
            for h, seed in ((a, 11), (b, 12))
        ]
        senders[0].start()  # a's server reads nothing yet: a parks
        request = a.relay._request
        a.run_until(lambda: request.held is not None or getattr(request, "pipe", None) is not None)
        sink_b = Sink(b.server, limit=total)
        sink_b.start()
        senders[1].start()
        a.run_until(lambda: sink_b.count >= total // 2)
        sink_a = Sink(a.server, limit=total)
        sink_a.start()  # a drains and gives its buffer back while b flows
        a.run_until(lambda: sink_a.count == total and sink_b.count == total)
        for sink, seed in ((sink_a, 11), (sink_b, 12)):
            expected = hashlib.sha256()
            for chunk in payload_chunks(total, seed):
                expected.update(chunk)
            assert sink.hash.hexdigest() == expected.hexdigest(), seed
    finally:
        b.close()
        a.close()
