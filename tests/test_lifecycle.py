"""Process lifecycle and the admin plane: drain, reload, workers, endpoints, metrics ports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pyproxy.native
import pytest
from conftest import ThreadedServer, free_port, http_get, recv_exactly


def _config(path, listen_port: int, upstream: str, **extra) -> None:
    lines = [
        "listeners:",
        "  - name: main",
        f"    address: 127.0.0.1:{listen_port}",
        f"    upstream: {upstream}",
    ]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")


def test_drain_lets_an_in_flight_transfer_finish_then_exits_0(start_proxy):
    total = 20 * 1024 * 1024
    started = threading.Event()

    def slow_upstream(conn: socket.socket) -> None:
        chunk = b"z" * 65536
        started.set()
        for _ in range(total // len(chunk)):
            conn.sendall(chunk)
            time.sleep(0.003)  # ~1 s for the whole transfer
        conn.shutdown(socket.SHUT_WR)

    server = ThreadedServer(slow_upstream)
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", server.address, "--drain-timeout", "20s"
    )
    client = socket.create_connection(("127.0.0.1", port))
    assert started.wait(5)
    proxy.signal(signal.SIGTERM)
    time.sleep(0.3)
    # New connections are refused while draining...
    refused = False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        refused = True
    assert refused
    # ...while the in-flight one completes, byte-exact.
    received = 0
    while data := client.recv(1024 * 1024):
        received += len(data)
    assert received == total
    client.close()
    assert proxy.stop() == 0


def test_drain_timeout_bounds_shutdown(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        echo_server.address,
        "--drain-timeout",
        "500ms",
    )
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"hi")
    assert recv_exactly(client, 2) == b"hi"
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 5
    assert client.recv(10) == b""  # the idle connection was closed at the deadline


def test_sighup_reload_applies_good_config_and_refuses_bad_one(start_proxy, tmp_path, echo_server):
    path = tmp_path / "proxy.yaml"
    port = free_port()
    _config(path, port, echo_server.address)
    proxy = start_proxy("-c", str(path))

    # A bad file: refused, the running config stays and keeps serving.
    path.write_text("listeners:\n  - name: main\n    address: nowhere\n")
    proxy.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "reload refused" in proxy.output and "listeners[0].address" in proxy.output
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"
    client.close()

    # A good file adding a listener: applied.
    second = free_port()
    _config(path, port, echo_server.address)
    path.write_text(
        path.read_text()
        + f"  - name: extra\n    address: 127.0.0.1:{second}\n    upstream: {echo_server.address}\n"
    )
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "extra" not in proxy.stats()["listeners"] and time.monotonic() < deadline:
        time.sleep(0.05)
    client = socket.create_connection(("127.0.0.1", second))
    client.sendall(b"new")
    assert recv_exactly(client, 3) == b"new"
    client.close()
    assert (
        proxy.wait_for(lambda s: s["connections_total"] == 1, name="extra")["connections_total"]
        == 1
    )


def test_several_workers_serve_and_admin_sums_them(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address, "--concurrency", "2"
    )
    info = json.loads(http_get(proxy.admin + "/server_info")[1])
    pids = {w["pid"] for w in info["workers"]}
    assert len(pids) == 2 and all(w["ready"] for w in info["workers"])
    connections = 40
    for i in range(connections):
        client = socket.create_connection(("127.0.0.1", port))
        payload = b"m%03d" % i
        client.sendall(payload)
        assert recv_exactly(client, 4) == payload
        client.close()
    stats = proxy.wait_for(
        lambda s: s["connections_active"] == 0 and s["connections_total"] == connections
    )
    assert stats["connections_total"] == connections
    assert stats["bytes"]["downstream_rx"] == stats["bytes"]["downstream_tx"] == 4 * connections
    # Both workers took connections (SO_REUSEPORT hashing spreads 40 connections across 2).
    per_worker = _per_worker_connections(proxy)
    assert sum(per_worker) == connections and all(n > 0 for n in per_worker), per_worker
    assert proxy.stop() == 0
    # The master's worker watcher ends with it, not left pending for the loop's close to log.
    assert "Task was destroyed" not in proxy.output, proxy.output


def _per_worker_connections(proxy) -> list[int]:
    info = json.loads(http_get(proxy.admin + "/server_info")[1])
    return [w["connections_total"] for w in info["workers"]]


def test_admin_endpoints(start_proxy, echo_server):
    port = free_port()
    prom, health = free_port(), free_port()
    proxy = start_proxy(
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        echo_server.address,
        "--prometheus",
        f"127.0.0.1:{prom}",
        "--health",
        f"127.0.0.1:{health}",
    )
    assert http_get(proxy.admin + "/ready") == (200, b"LIVE\n")
    assert http_get(f"http://127.0.0.1:{health}/healthz/ready")[0] == 200
    status, body = http_get(proxy.admin + "/stats")
    assert status == 200 and b"listeners.main.connections_total: 0" in body
    dump = json.loads(http_get(proxy.admin + "/config_dump")[1])
    assert dump["listeners"][0]["upstream"] == echo_server.address
    info = json.loads(http_get(proxy.admin + "/server_info")[1])
    assert info["state"] == "LIVE" and info["event_loop"] in ("uvloop", "asyncio")
    assert info["workers"][0]["notify_cost_ns"] > 0
    assert http_get(proxy.admin + "/nope")[0] == 404
    assert http_get(proxy.admin + "/quitquitquit")[0] == 405
    assert http_get(proxy.admin + "/drain_listeners")[0] == 405

    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"0123456789")
    assert recv_exactly(client, 10) == b"0123456789"
    client.close()
    proxy.wait_for(lambda s: s["connections_active"] == 0)
    for url in (f"http://127.0.0.1:{prom}/stats/prometheus", proxy.admin + "/stats/prometheus"):
        status, body = http_get(url)
        text = body.decode()
        assert status == 200
        assert 'pyproxy_connections_total{listener="main",mode="tcp"} 1.0' in text
        assert (
            'pyproxy_bytes_total{direction="rx",listener="main",mode="tcp",side="downstream"} 10.0'
            in text
            or (
                'pyproxy_bytes_total{listener="main",mode="tcp",side="downstream",direction="rx"} 10.0'
                in text
            )
        )
        assert 'pyproxy_stage_seconds_total{listener="main",mode="tcp",stage="ipc"}' in text
        assert 'pyproxy_request_duration_seconds_count{listener="main",mode="tcp"} 1.0' in text

    assert http_get(proxy.admin + "/drain_listeners", method="POST")[0] == 200
    time.sleep(0.2)
    assert http_get(f"http://127.0.0.1:{health}/healthz/ready")[0] == 503
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise AssertionError("listener still accepting after /drain_listeners")
    except ConnectionRefusedError:
        pass
    assert http_get(proxy.admin + "/quitquitquit", method="POST")[0] == 200
    assert proxy.proc.wait(10) == 0


def test_stage_clock_off_records_no_stage_time(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address, "--no-stage-clock"
    )
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"abc")
    assert recv_exactly(client, 3) == b"abc"
    client.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert all(stage["ns"] == 0 for stage in stats["stages"].values())
    assert stats["bytes"]["downstream_rx"] == 3  # traffic counters stay on


@pytest.mark.parametrize("native", [True, False], ids=["native-step", "python-relay"])
def test_stage_clock_attributes_app_side_to_ipc(start_proxy, echo_server, monkeypatch, native):
    if native and not pyproxy.native.AVAILABLE:
        pytest.skip(f"native module: {pyproxy.native.UNAVAILABLE_REASON}")
    if not native:
        monkeypatch.setenv("PYPROXY_DISABLE_NATIVE", "1")
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address)
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(200):
        client.sendall(b"x" * 100)
        recv_exactly(client, 100)
    client.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    stages = stats["stages"]
    # Standalone: the upstream is the local app, so its send+recv are ipc; downstream recv is read, send is write.
    assert stages["ipc"]["events"] >= 400
    assert stages["read"]["events"] >= 200 and stages["write"]["events"] >= 200
    assert stages["notify"]["events"] >= 400 and stages["notify"]["ns"] > 0
    assert all(stages[s]["ns"] > 0 for s in ("ipc", "read", "write"))
    # The Python relay's own work between the calls is timed as `other`; the C step's is a few
    # integer adds, less than a clock read, and is left untimed.
    assert (stages["other"]["ns"] > 0) is not native


def test_pyproxy_stats_prints_the_stage_table(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address)
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"
    client.close()
    out = subprocess.run(
        [sys.executable, "-m", "pyproxy", "stats", "--admin", f"127.0.0.1:{proxy.admin_port}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "listener main (tcp, standalone)" in out
    for stage in ("ipc", "read", "write", "notify", "parse", "other", "total"):
        assert f"\n  {stage} " in out


def test_runs_on_plain_asyncio_too(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        echo_server.address,
        "--event-loop",
        "asyncio",
    )
    assert json.loads(http_get(proxy.admin + "/server_info")[1])["event_loop"] == "asyncio"
    client = socket.create_connection(("127.0.0.1", port))
    payload = b"a" * 300_000
    client.sendall(payload)
    assert recv_exactly(client, len(payload)) == payload
    client.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert stats["bytes"]["upstream_rx"] == len(payload)
    assert stats["stages"]["notify"]["ns"] > 0
