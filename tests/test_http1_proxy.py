"""HTTP/1.1 mode through a real pyproxy process with real peers (curl, raw sockets, an h11 upstream)."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from conftest import curl, free_port, recv_exactly, require_capability, start_listener
from http_peer import HttpUpstream

CODECS = ["fast", "h11"]


def _http_proxy(start_proxy, tmp_path, upstream_address: str, codec: str = "fast", extra: str = ""):
    http = f"    http:\n      codec: {codec}\n      request_header_timeout: 1s\n{extra}"
    return start_listener(start_proxy, tmp_path, upstream_address, http)


def _raw(port: int, data: bytes, read_until_close: bool = True, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close and out.endswith(b"\r\n\r\n"):
                break
        return out


@pytest.mark.parametrize("codec", CODECS)
def test_get_keepalive_both_sides(start_proxy, tmp_path, upstream, codec):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address, codec)
    urls = [
        f"http://127.0.0.1:{port}/a",
        f"http://127.0.0.1:{port}/b",
        f"http://127.0.0.1:{port}/c",
    ]
    result = curl(
        "-w", "%{http_code} %{num_connects}\n", *[x for u in urls for x in (u, "-o", "/dev/null")]
    )
    lines = result.stdout.decode().split()
    assert lines == ["200", "1", "200", "0", "200", "0"], result
    assert upstream.connections == 1  # the pool reused the upstream connection
    stats = proxy.wait_for(lambda s: s["requests"] == 3)
    assert stats["responses"]["2xx"] == 3 and stats["flags"] == {}
    assert stats["stages"]["parse"]["ns"] > 0


@pytest.mark.parametrize("codec", CODECS)
def test_pipelined_requests_answered_in_order(start_proxy, tmp_path, upstream, codec):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address, codec)
    pipeline = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
    pipeline += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = _raw(port, pipeline)
    bodies = [part for part in out.split(b"\r\n\r\n")[1:]]
    texts = b"".join(bodies)
    for i in range(5):
        assert b"ok:/p%d:up" % i in texts
    assert texts.index(b"ok:/p0") < texts.index(b"ok:/p4") < texts.index(b"ok:/last")
    assert out.count(b"HTTP/1.1 200") == 6


@pytest.mark.parametrize("codec", CODECS)
def test_chunked_bodies_both_ways_and_hop_by_hop_removed(start_proxy, tmp_path, upstream, codec):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address, codec)
    body = b"z" * 300_000
    result = curl(
        "-H", "Transfer-Encoding: chunked", "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1",
        "-H", "Keep-Alive: timeout=5", "-H", "TE: trailers", "--data-binary", "@-",
        f"http://127.0.0.1:{port}/echo",
    )  # fmt: skip
    result = subprocess.run(
        ["curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1",
         "-H", "Keep-Alive: timeout=5", "--data-binary", "@-", f"http://127.0.0.1:{port}/echo"],
        input=body, capture_output=True, timeout=20,
    )  # fmt: skip
    info = json.loads(result.stdout)
    names = {name for name, _ in info["headers"]}
    assert info["body_length"] == len(body)
    assert "x-secret" not in names and "keep-alive" not in names  # RFC 9110 §7.6.1
    assert ("transfer-encoding", "chunked") in [tuple(h) for h in info["headers"]]
    result = curl("-D", "-", f"http://127.0.0.1:{port}/chunked?n=50")
    head, _, payload = result.stdout.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert payload == b"c" * 50_000


def test_large_bodies_stream_with_bounded_memory(start_proxy, tmp_path, upstream):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address)
    baseline = proxy.rss_kib()
    size = 200 * 1024 * 1024
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "--limit-rate",
            "40M",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            f"http://127.0.0.1:{port}/big?mb=200",
        ],
        stdout=subprocess.PIPE,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, proxy.rss_kib())
        time.sleep(0.1)
    assert proc.stdout.read() == str(size).encode()
    assert peak - baseline < 32 * 1024, (
        baseline,
        peak,
    )  # a slow client never makes the proxy hold the body


@pytest.mark.parametrize("codec", CODECS)
def test_expect_100_continue(start_proxy, tmp_path, upstream, codec):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address, codec)
    body = b"e" * 2_000_000
    result = subprocess.run(
        ["curl", "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary", "@-", f"http://127.0.0.1:{port}/echo"],
        input=body, capture_output=True, timeout=20,
    )  # fmt: skip
    assert b"< HTTP/1.1 100" in result.stderr
    assert json.loads(result.stdout)["body_length"] == len(body)


@pytest.mark.parametrize("codec", CODECS)
def test_head_204_304_have_no_body(start_proxy, tmp_path, upstream, codec):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address, codec)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"HEAD /big?mb=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1048576" in head.lower()
        for status in (204, 304):
            sock.sendall(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % status)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 %d" % status)
            assert b"transfer-encoding" not in head.lower()
        # The connection is still in sync: a normal request works right after.
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while b"ok:/after" not in out:
            out += sock.recv(4096)


def test_upgrade_switches_to_a_byte_relay(start_proxy, tmp_path, upstream):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        rest = head.split(b"\r\n\r\n", 1)[1]
        rest += recv_exactly(sock, 5 - len(rest)) if len(rest) < 5 else b""
        assert rest == b"early"
        sock.sendall(b"raw bytes after the switch")
        assert recv_exactly(sock, 26) == b"raw bytes after the switch"


def test_pooled_connection_closed_by_app_is_retried_once(start_proxy, tmp_path, upstream):
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        # The app answers keep-alive, then closes: the pool holds a dead connection.
        sock.sendall(b"GET /close-after HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while b"closing" not in out:
            out += sock.recv(4096)
        sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while b"ok:/next" not in out:
            chunk = sock.recv(4096)
            assert chunk, out
            out += chunk
        assert out.startswith(b"HTTP/1.1 200")


def test_error_mappings_and_the_proxy_keeps_serving(start_proxy, tmp_path, upstream):
    dead = free_port()
    proxy, port = _http_proxy(
        start_proxy, tmp_path, upstream.address,
        extra=f"""    routes:
      - match: {{prefix: /dead}}
        cluster: dead
      - match: {{prefix: /slow}}
        timeout: 300ms
      - match: {{prefix: /}}
clusters:
  dead:
    endpoints: [127.0.0.1:{dead}]
""",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url + "/dead").stdout == b"503"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url + "/slow?ms=2000").stdout == b"504"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url + "/reset").stdout == b"503"
    # malformed request line → 400 and close
    assert _raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    # Content-Length with Transfer-Encoding (smuggling) → 400
    smuggle = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(port, smuggle).startswith(b"HTTP/1.1 400")
    # header section over 60 KiB → 431
    big = (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        + b"\r\n"
    )
    assert _raw(port, big).startswith(b"HTTP/1.1 431")
    too_many = (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(150))
        + b"\r\n"
    )
    assert _raw(port, too_many).startswith(b"HTTP/1.1 431")
    # slowloris: a head that never finishes → 408 and close after the header timeout (1s here)
    started = time.monotonic()
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", timeout=5).startswith(
        b"HTTP/1.1 408"
    )
    assert 0.8 < time.monotonic() - started < 4
    # still serving
    assert curl(url + "/fine").stdout == b"ok:/fine:up"
    stats = proxy.listener()
    assert (
        stats["flags"].get("UF") == 1
        and stats["flags"].get("UT") == 1
        and stats["flags"].get("UC") == 1
    )
    assert stats["flags"].get("DPE") == 4 and stats["flags"].get("DT") == 1
    assert stats["responses"]["5xx"] == 3 and stats["responses"]["4xx"] == 5


def test_routing_by_authority_and_prefix_round_robin(start_proxy, tmp_path):
    a1, a2, b = HttpUpstream("a1"), HttpUpstream("a2"), HttpUpstream("b")
    proxy, port = _http_proxy(
        start_proxy, tmp_path, b.address,
        extra=f"""    routes:
      - match: {{authority: api.test, prefix: /v1}}
        cluster: api
      - match: {{prefix: /static}}
        cluster: static
clusters:
  api:
    endpoints: [{a1.address}, {a2.address}]
  static:
    endpoints: [{b.address}]
""",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    seen = [curl("-H", "Host: api.test:8080", url + "/v1/x").stdout for _ in range(4)]
    assert sorted(seen) == [b"ok:/v1/x:a1", b"ok:/v1/x:a1", b"ok:/v1/x:a2", b"ok:/v1/x:a2"]
    assert curl(url + "/static/y").stdout == b"ok:/static/y:b"
    assert (
        curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: other", url + "/v1/x").stdout
        == b"404"
    )
    assert proxy.listener()["flags"] == {"NR": 1}


def test_access_log_and_server_timing(start_proxy, tmp_path, upstream):
    log_path = tmp_path / "access.log"
    proxy, port = _http_proxy(
        start_proxy, tmp_path, upstream.address,
        extra=f"      server_timing: true\n      access_log: {log_path}\n",
    )  # fmt: skip
    result = curl("-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{port}/timed")
    headers = result.stdout.decode().lower()
    timing = [line for line in headers.splitlines() if line.startswith("server-timing:")]
    assert timing and "ipc;dur=" in timing[0] and "parse;dur=" in timing[0]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (log_path.exists() and log_path.read_text()):
        time.sleep(0.05)
    record = json.loads(log_path.read_text().splitlines()[0])
    assert record["method"] == "GET" and record["path"] == "/timed" and record["status"] == 200
    assert record["upstream_host"] == upstream.address and record["response_flags"] == "-"
    assert record["bytes_sent"] == len(b"ok:/timed:up") and record["stages_us"]["ipc"] > 0
    assert oct(log_path.stat().st_mode & 0o777) == "0o640"


def test_wrk_smoke(start_proxy, tmp_path, upstream):
    import shutil

    require_capability("wrk (wrk; make test installs it)", shutil.which("wrk") is not None)
    proxy, port = _http_proxy(start_proxy, tmp_path, upstream.address)
    run = subprocess.run(
        ["wrk", "-t1", "-c4", "-d1s", f"http://127.0.0.1:{port}/w"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Requests/sec" in run.stdout
    assert "Non-2xx" not in run.stdout and "Socket errors" not in run.stdout, run.stdout
    # wrk stops by closing its 4 connections, each possibly with a request in flight: those
    # end as downstream-closed (DR/DC), never as anything else. One cut after its upstream's
    # head came keeps that status (Envoy's 200 + DC): it counts as 2xx too.
    stats = proxy.wait_for(lambda listener: listener["connections_active"] == 0)
    cut = stats["flags"].get("DR", 0) + stats["flags"].get("DC", 0)
    assert stats["requests"] > 100 and cut <= 4 and set(stats["flags"]) <= {"DR", "DC"}, stats
    ok = stats["responses"]["2xx"]
    assert stats["requests"] - cut <= ok <= stats["requests"], stats
    assert sum(stats["responses"].values()) == ok, stats


def test_local_reply_keeps_a_bodyless_request_connection_alive(start_proxy, tmp_path, upstream):
    proxy, port = _http_proxy(
        start_proxy, tmp_path, upstream.address,
        extra='    filters:\n      - name: fault\n        config: {abort: {http_status: 503}}\n',
    )  # fmt: skip
    result = curl("-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
                  f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b")  # fmt: skip
    assert result.stdout.decode().split() == ["503", "1", "503", "0"]


def test_prometheus_has_status_classes_and_filter_counters(start_proxy, tmp_path, upstream):
    proxy, port = _http_proxy(
        start_proxy, tmp_path, upstream.address,
        extra='    filters:\n      - name: fault\n        config: {abort: {http_status: 503, header_abort: true, percentage: 100}}\n',
    )  # fmt: skip
    assert (
        curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/x").stdout == b"503"
    )
    from conftest import http_get

    text = http_get(proxy.admin + "/stats/prometheus")[1].decode()
    assert 'pyproxy_responses_total{class="5xx",listener="main",mode="http"} 1.0' in text or (
        'pyproxy_responses_total{listener="main",mode="http",class="5xx"} 1.0' in text
    )
    assert 'counter="aborts_injected"' in text and 'filter="fault"' in text
    assert 'stage="filter:fault"' in text


def test_sighup_reload_swaps_the_filter_chain_for_new_requests(start_proxy, tmp_path, upstream):
    import signal

    port = free_port()
    path = tmp_path / "proxy.yaml"
    base = f"listeners:\n  - name: main\n    mode: http\n    address: 127.0.0.1:{port}\n    upstream: {upstream.address}\n"
    path.write_text(
        base + "    filters:\n      - name: fault\n        config: {abort: {http_status: 418}}\n"
    )
    proxy = start_proxy("-c", str(path))
    url = f"http://127.0.0.1:{port}/r"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url).stdout == b"418"
    # A bad filter config is refused and the running chain stays.
    path.write_text(
        base + "    filters:\n      - name: fault\n        config: {abort: {http_status: 99}}\n"
    )
    proxy.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "reload refused" in proxy.output and "abort.http_status" in proxy.output
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url).stdout == b"418"
    # A good one without filters applies to the next request.
    path.write_text(base)
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if curl("-o", "/dev/null", "-w", "%{http_code}", url).stdout == b"200":
            break
        time.sleep(0.1)
    assert curl(url).stdout == b"ok:/r:up"
