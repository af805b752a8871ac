"""Overload: idle connections cost a few KB each, memory comes back after they close, and beyond the
per-worker limits connections are reset and requests answered 503 at once, counted as refused."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from conftest import free_port, http_get, recv_exactly, require_capability, start_listener
from h2_peer import H2Client
from pyproxy.bench.memory import measure

from pyproxy import native
from pyproxy.codec.grpc import frame
from pyproxy.io.buffer_pool import SPARE
from pyproxy.memory_trim import CHECK_INTERVAL, TRIM_AFTER_DROP

IDLE_BYTES_PER_CONNECTION = 10 * 1024


def test_idle_tcp_connections_cost_under_10kb_each_and_memory_returns():
    # 1,000 silent connections (each with its upstream side) through a real proxy process;
    # before relay buffers were pooled each one held ~135 KB and none of it came back.
    result = measure("tcp", 1000, 1, [], settle=5.0)  # a trim follows within one 2 s check
    held = result["rounds"][0]
    assert held["active_seen"] == 1000 and held["active_after_close"] == 0, result
    assert result["per_connection_bytes"] < IDLE_BYTES_PER_CONNECTION, result
    # Within a few MB of the baseline: what stays is allocator slack, not per-connection state.
    assert result["after_close_above_baseline_kib"] < 4 * 1024, result


def test_a_worker_trims_its_heap_when_connections_fall_back(start_proxy):
    # The burst's memory goes back only if the worker trims once the count fell by
    # TRIM_AFTER_DROP (under pymalloc, arenas a few survivors pin stay: memory_trim.py).
    port = free_port()
    proxy = start_proxy("--mode", "http", "--listen", f"127.0.0.1:{port}",
                        "--upstream", "127.0.0.1:9")  # fmt: skip
    info = server_info(proxy)
    assert info["allocator"] == "pymalloc"
    assert info["workers"][0]["memory_trims"] == 0, "nothing to return while idle"
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(TRIM_AFTER_DROP + 20)]  # fmt: skip
    active = proxy.wait_for(lambda s: s["connections_active"] == len(conns))
    assert active["connections_active"] == len(conns)
    time.sleep(CHECK_INTERVAL + 0.5)  # a check sees them all: the high-water mark
    assert server_info(proxy)["workers"][0]["memory_trims"] == 0, "no trim while they are held"
    for sock in conns:
        sock.close()
    assert proxy.wait_for(lambda s: s["connections_active"] == 0)["connections_active"] == 0
    deadline = time.monotonic() + 3 * CHECK_INTERVAL + 5
    while server_info(proxy)["workers"][0]["memory_trims"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_info(proxy)["workers"][0]["memory_trims"] >= 1


def test_server_info_names_the_allocator_the_environment_chose(start_proxy, monkeypatch):
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    proxy = start_proxy("--mode", "http", "--listen", f"127.0.0.1:{free_port()}",
                        "--upstream", "127.0.0.1:9")  # fmt: skip
    assert server_info(proxy)["allocator"] == "malloc"


def test_reading_the_admin_does_not_load_http_codecs_into_a_tcp_worker(start_proxy, echo_server):
    # /server_info once loaded hyper-h2 to name the HTTP/2 codec, and the first /stats the
    # HTTP/1 codecs with httptools (through the codec package): 3.6 MiB of an idle worker.
    proxy = start_proxy("--listen", f"127.0.0.1:{free_port()}", "--upstream", echo_server.address)
    pid = server_info(proxy)["workers"][0]["pid"]
    assert http_get(proxy.admin + "/stats?format=json")[0] == 200
    with open(f"/proc/{pid}/maps") as maps:
        mapped = maps.read()
    assert "httptools" not in mapped and "_http1head" not in mapped


def _h2_imports(proxy) -> list[str]:
    """hyper-h2's modules the proxy's processes imported so far (PYTHONPROFILEIMPORTTIME names
    each import, on stderr, when it happens)."""
    lines = [line for line in proxy.output.splitlines() if line.startswith("import time:")]
    return [line for line in lines if line.rsplit("|", 1)[-1].strip().split(".")[0] == "h2"]


def test_an_http1_connection_does_not_load_hyper_h2_into_the_worker(
    start_proxy, upstream, monkeypatch
):
    # hyper-h2 and its modules are about 1.5 MiB; loaded by the first connection of a burst they
    # also sit among the burst's objects in the arenas that should go back after it.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    port = free_port()
    proxy = start_proxy("--mode", "http", "--listen", f"127.0.0.1:{port}",
                        "--upstream", upstream.address)  # fmt: skip
    assert http_get(f"http://127.0.0.1:{port}/one") == (200, b"ok:/one:up")
    assert _h2_imports(proxy) == []
    client = H2Client(port)  # the same listener, HTTP/2 this time: now it loads
    try:
        answer = client.wait([client.request("/two")])[0]
        assert answer["status"] == 200
    finally:
        client.close()
    assert _h2_imports(proxy), "HTTP/2 served without hyper-h2's modules imported?"


def server_info(proxy) -> dict:
    status, body = http_get(proxy.admin + "/server_info")
    assert status == 200
    return json.loads(body)


def test_idle_splice_connections_hold_no_pipes(start_proxy, echo_server):
    # Each connection used to own two pipes (four fds) for its whole life; now a pipe is held
    # only while a destination is full, so idle connections cost their two sockets alone.
    require_capability("the native module (splice)", native.AVAILABLE)
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address, "--relay", "splice"
    )  # fmt: skip
    before = len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        assert all(_echoes(sock) for sock in conns), "every connection relayed through a pipe"
        assert proxy.wait_for(lambda s: s["connections_active"] == 50)["connections_active"] == 50
        opened = len(os.listdir(f"/proc/{proxy.proc.pid}/fd")) - before
        # 100 sockets, plus the pool's spare pipes (a handful here; at most 2 x SPARE fds).
        assert 100 <= opened <= 100 + 2 * SPARE, opened
    finally:
        for sock in conns:
            sock.close()


def _echoes(sock: socket.socket) -> bool:
    sock.sendall(b"ping")
    return recv_exactly(sock, 4) == b"ping"


def test_connections_beyond_max_connections_are_reset_and_counted(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address,
        "--max-connections", "2",
    )  # fmt: skip
    assert proxy.wait_for(lambda s: s["connections_active"] == 0)["connections_active"] == 0
    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    second = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert _echoes(first) and _echoes(second)
    try:
        # The reset can beat connect()'s own completion check: then connect raises it.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            third.sendall(b"ping")
            assert third.recv(16) == b"", "the refused connection carried data"
    except ConnectionResetError:
        pass  # the expected outcome: reset at once
    snap = proxy.wait_for(lambda s: s["refused"]["connections"] == 1)
    assert snap["refused"] == {"connections": 1, "requests": 0}
    assert snap["connections_active"] == 2
    assert _echoes(first) and _echoes(second), "held connections go on regardless"
    first.close()
    assert proxy.wait_for(lambda s: s["connections_active"] == 1)["connections_active"] == 1
    fourth = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert _echoes(fourth), "below the limit again: served"
    fourth.close()
    second.close()
    metrics = http_get(proxy.admin + "/stats/prometheus")[1].decode()
    assert 'pyproxy_refused_total{kind="connections",listener="main",mode="tcp"} 1.0' in metrics


def test_requests_beyond_max_pending_are_answered_503_at_once(start_proxy, tmp_path, upstream):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, top="max_pending_requests: 1\n",
        body="    http:\n      express_lane: off\n",
    )  # fmt: skip
    slow: dict = {}

    def first() -> None:
        slow["answer"] = http_get(f"http://127.0.0.1:{port}/slow?ms=1500", timeout=10)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 5
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.requests, "the first request never reached the upstream"
    t0 = time.monotonic()
    status, body = http_get(f"http://127.0.0.1:{port}/second")
    assert (status, body) == (503, b"overloaded: too many requests in progress\n")
    assert time.monotonic() - t0 < 1.0, "refused fast, not after the pending one"
    thread.join()
    assert slow["answer"] == (200, b"slow")
    assert http_get(f"http://127.0.0.1:{port}/third") == (200, b"ok:/third:up")
    snap = proxy.listener()
    assert snap["refused"] == {"connections": 0, "requests": 1}
    assert snap["flags"]["UO"] == 1
    assert [r["path"] for r in upstream.requests] == ["/slow", "/third"]


def test_http2_streams_beyond_max_pending_get_503_and_grpc_calls_unavailable(
    start_proxy, tmp_path, upstream
):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, top="max_pending_requests: 1\n"
    )
    client = H2Client(port)
    try:
        held = client.request("/slow?ms=1500")
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.requests, "the first stream never reached the upstream"
        refused = client.request("/second")
        call = client.request(
            "/echo.Echo/Say", method="POST", body=frame(b""),
            headers=[("content-type", "application/grpc"), ("te", "trailers")],
        )  # fmt: skip
        answered = client.wait([refused, call], timeout=1.0)
        assert [r["done"] for r in answered] == [True, True], "refused at once"
        assert answered[0]["status"] == 503
        assert bytes(answered[0]["body"]) == b"overloaded: too many requests in progress\n"
        grpc_reply = dict(answered[1]["headers"])
        assert answered[1]["status"] == 200 and grpc_reply[b"grpc-status"] == b"14"  # UNAVAILABLE
        first = client.wait([held])[0]
        assert (first["status"], bytes(first["body"])) == (200, b"slow")
    finally:
        client.close()
    assert proxy.listener()["refused"] == {"connections": 0, "requests": 2}
    assert [r["path"] for r in upstream.requests] == ["/slow"]
