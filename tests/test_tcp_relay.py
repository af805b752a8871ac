"""TCP mode through a real pyproxy process: byte-exact relay, half-close, resets, timeouts, backpressure."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest
from byte_streams import flood_handler
from conftest import ThreadedServer, free_port, recv_exactly

from pyproxy import native

MB = 1024 * 1024
# Who runs the copy step on a readable socket: the event loop, or libuv's poll callback in C.
DISPATCH = pytest.mark.parametrize(
    "dispatch",
    [
        pytest.param(("--relay-dispatch", "loop"), id="loop"),
        pytest.param(
            (), id="libuv",  # the default on uvloop with the native module
            marks=pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON)),
        ),
    ],
)  # fmt: skip


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _standalone(start_proxy, upstream: str, *extra: str):
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", upstream, *extra)
    return proxy, port


def _stream_random(sock: socket.socket, total: int, seed: int) -> str:
    """Send `total` pseudo-random bytes; return their sha256."""
    digest = hashlib.sha256()
    rng = __import__("random").Random(seed)
    sent = 0
    while sent < total:
        chunk = rng.randbytes(min(256 * 1024, total - sent))
        digest.update(chunk)
        sock.sendall(chunk)
        sent += len(chunk)
    return digest.hexdigest()


def _drain_digest(sock: socket.socket) -> tuple[int, str]:
    digest, total = hashlib.sha256(), 0
    while True:
        data = sock.recv(1024 * 1024)
        if not data:
            return total, digest.hexdigest()
        digest.update(data)
        total += len(data)


def test_100mb_each_way_at_once_is_byte_exact_and_counted_exactly(start_proxy):
    total = 100 * MB
    upstream_result: dict = {}

    def upstream(conn: socket.socket) -> None:
        # Send our own stream while receiving the client's: both directions at once.
        sender = threading.Thread(
            target=lambda: upstream_result.update(sent=_stream_random(conn, total, 2))
        )
        sender.start()
        upstream_result["received"] = _drain_digest(conn)
        sender.join()
        conn.shutdown(socket.SHUT_WR)

    server = ThreadedServer(upstream)
    proxy, port = _standalone(start_proxy, server.address)
    client = _connect(port)
    client_result: dict = {}
    receiver = threading.Thread(target=lambda: client_result.update(received=_drain_digest(client)))
    receiver.start()
    sent_digest = _stream_random(client, total, 1)
    client.shutdown(socket.SHUT_WR)
    receiver.join(60)
    client.close()
    assert not server.errors
    assert upstream_result["received"] == (total, sent_digest)
    assert client_result["received"] == (total, upstream_result["sent"])
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert stats["connections_total"] == 1
    assert stats["bytes"] == {
        "downstream_rx": total,
        "upstream_tx": total,
        "upstream_rx": total,
        "downstream_tx": total,
    }
    assert stats["duration"]["count"] == 1
    assert stats["flags"] == {}


@DISPATCH
def test_half_close_travels_both_ways(start_proxy, dispatch):
    def upstream(conn: socket.socket) -> None:
        # Read the request until the client's FIN, then answer and close our side.
        request = b""
        while chunk := conn.recv(4096):
            request += chunk
        conn.sendall(b"got:" + request)
        conn.shutdown(socket.SHUT_WR)

    server = ThreadedServer(upstream)
    proxy, port = _standalone(start_proxy, server.address, *dispatch)
    client = _connect(port)
    client.sendall(b"hello")
    client.shutdown(socket.SHUT_WR)  # the upstream only answers after seeing this FIN
    answer = b""
    while chunk := client.recv(4096):
        answer += chunk
    assert answer == b"got:hello"
    client.close()

    # And the other way: the upstream half-closes first, the client keeps sending.
    def upstream_first(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        assert data == b"after-fin"

    server2 = ThreadedServer(upstream_first)
    proxy2, port2 = _standalone(start_proxy, server2.address, *dispatch)
    client = _connect(port2)
    assert recv_exactly(client, 6) == b"banner"
    assert client.recv(10) == b""  # FIN arrived through the proxy
    client.sendall(b"after-fin")  # our direction is still open
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.3)
    client.close()
    assert not server2.errors
    assert proxy2.wait_for(lambda s: s["connections_active"] == 0)["bytes"]["upstream_tx"] == 9


@DISPATCH
def test_upstream_reset_is_propagated_as_reset(start_proxy, dispatch):
    def upstream(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = ThreadedServer(upstream)
    proxy, port = _standalone(start_proxy, server.address, *dispatch)
    client = _connect(port)
    client.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        for _ in range(50):
            if client.recv(10) == b"":
                raise AssertionError("got a FIN, expected a reset")
    assert proxy.wait_for(lambda s: "UR" in s["flags"])["flags"] == {"UR": 1}


@DISPATCH
def test_downstream_reset_resets_upstream(start_proxy, dispatch):
    seen: list[str] = []

    def upstream(conn: socket.socket) -> None:
        try:
            while conn.recv(10):
                pass
            seen.append("fin")
        except ConnectionResetError:
            seen.append("reset")

    server = ThreadedServer(upstream)
    proxy, port = _standalone(start_proxy, server.address, *dispatch)
    client = _connect(port)
    client.sendall(b"x")
    time.sleep(0.2)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert proxy.wait_for(lambda s: "DR" in s["flags"])["flags"] == {"DR": 1}
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == ["reset"]


def test_upstream_refused_closes_downstream_with_flag(start_proxy):
    dead_port = free_port()  # nothing listens here
    proxy, port = _standalone(start_proxy, f"127.0.0.1:{dead_port}")
    for _ in range(3):
        client = _connect(port)
        assert client.recv(10) == b""
        client.close()
    stats = proxy.wait_for(lambda s: s["flags"].get("UF") == 3)
    assert stats["flags"] == {"UF": 3}
    assert stats["connections_active"] == 0 and stats["connections_total"] == 3


def test_connect_timeout_closes_downstream(start_proxy):
    # A listener that never accepts, with its backlog already full: SYNs are dropped, connect hangs.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(stuck.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    proxy, port = _standalone(
        start_proxy, f"127.0.0.1:{stuck.getsockname()[1]}", "--connect-timeout", "300ms"
    )
    client = _connect(port)
    started = time.monotonic()
    assert client.recv(10) == b""
    elapsed = time.monotonic() - started
    assert 0.2 < elapsed < 3.0
    assert proxy.wait_for(lambda s: "UF" in s["flags"])["flags"] == {"UF": 1}
    for s in fillers:
        s.close()
    stuck.close()


@DISPATCH
def test_idle_timeout_closes_quiet_connections_only(start_proxy, echo_server, dispatch):
    proxy, port = _standalone(
        start_proxy, echo_server.address, "--idle-timeout", "400ms", *dispatch
    )
    busy, quiet = _connect(port), _connect(port)
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        busy.sendall(b"ping")
        assert recv_exactly(busy, 4) == b"ping"
        time.sleep(0.05)
    assert quiet.recv(10) == b""  # closed by the proxy while idle
    assert time.monotonic() - started < 2.0
    busy.sendall(b"still")
    assert recv_exactly(busy, 5) == b"still"
    busy.close()
    assert proxy.wait_for(lambda s: s["flags"].get("SI") == 1)["flags"]["SI"] == 1


def test_slow_consumer_keeps_proxy_memory_bounded(start_proxy):
    total = 192 * MB
    done = threading.Event()

    server = ThreadedServer(flood_handler(total, done))
    proxy, port = _standalone(start_proxy, server.address)
    baseline = proxy.rss_kib()
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    # Read slowly: the upstream can produce far faster than we consume.
    received, peak = 0, 0
    for _ in range(40):
        received += len(client.recv(64 * 1024))
        time.sleep(0.02)
        peak = max(peak, proxy.rss_kib())
    assert not done.is_set(), (
        "upstream finished: the proxy buffered everything instead of pushing back"
    )
    # The proxy holds one buffer (16 KiB) per direction; kernel socket buffers are not RSS.
    assert peak - baseline < 16 * 1024, (baseline, peak)
    stats = proxy.listener()
    assert stats["bytes"]["upstream_rx"] < 32 * MB  # backpressure reached the upstream
    client.close()


@DISPATCH
def test_several_connections_at_once_are_isolated(start_proxy, echo_server, dispatch):
    proxy, port = _standalone(start_proxy, echo_server.address, *dispatch)
    clients = [_connect(port) for _ in range(20)]
    for round_ in range(20):
        for i, client in enumerate(clients):
            client.sendall(b"%d:%d;" % (i, round_))
        for i, client in enumerate(clients):
            expected = b"%d:%d;" % (i, round_)
            assert recv_exactly(client, len(expected)) == expected
    for client in clients:
        client.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert stats["connections_total"] == 20
    assert stats["messages"] >= 20  # merged writes may arrive as one read
    assert (
        stats["bytes"]["downstream_rx"]
        == stats["bytes"]["downstream_tx"]
        == stats["bytes"]["upstream_rx"]
    )
