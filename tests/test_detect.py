"""Protocol detection on mode-http listeners: HTTP/2 preface, HTTP/1 request line, opaque TCP fallback
(server-first protocols), per-port overrides — through a real pyproxy with real peers."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from conftest import ThreadedServer, echo_handler, free_port, recv_exactly, start_listener
from http_peer import HttpUpstream

from pyproxy.codec.http2 import PREFACE
from pyproxy.config import ConfigError, build_config
from pyproxy.http.detect import HTTP1, HTTP2, TCP, classify


@pytest.mark.parametrize(
    ("data", "fallback", "verdict"),
    [
        (PREFACE, True, HTTP2),
        (PREFACE[:10], True, None),  # could still be the preface
        (PREFACE + b"\x00\x00", False, HTTP2),
        (b"GET / HTTP/1.1\r\n", True, HTTP1),
        (b"OPTIONS * HTTP/1.0\r\nHost: x\r\n", True, HTTP1),
        (b"GET /still-coming", True, None),
        (b"get key\r\n", True, TCP),  # memcached text protocol
        (b"*1\r\n$4\r\nPING\r\n", True, TCP),  # Redis
        (b"\x16\x03\x01\x02\x00\x01", True, TCP),  # TLS ClientHello
        (b"\x16\x03\x01\x02\x00\x01", False, HTTP1),  # no fallback: HTTP/1 answers 400
        (b"A" * 9000, True, TCP),  # no request line ends that late
    ],
)
def test_classify_first_bytes(data, fallback, verdict):
    assert classify(data, fallback) == verdict


def test_detection_config_validates():
    base = {"name": "l", "mode": "http", "address": "127.0.0.1:1", "upstream": "127.0.0.1:2"}
    listener = build_config({"listeners": [base]}).listeners[0]
    assert listener.detect == "http" and listener.detect_timeout == 0.1 and listener.ports == ()
    inbound = build_config({"listeners": [{"name": "i", "kind": "inbound", "mode": "http",
                                           "address": "127.0.0.1:3"}]}).listeners[0]  # fmt: skip
    assert inbound.detect == "auto"  # capture listeners fall back to TCP by default
    tuned = dict(base, detect="auto", detect_timeout="50ms", ports={3306: "tcp", 8080: "http2"})
    listener = build_config({"listeners": [tuned]}).listeners[0]
    assert listener.ports == ((3306, "tcp"), (8080, "http2")) and listener.detect_timeout == 0.05
    bad = [
        (dict(base, ports={3306: "mysql"}), "listeners[0].ports"),
        (dict(base, ports={0: "tcp"}), "listeners[0].ports"),
        (dict(base, detect="sniff"), "listeners[0].detect"),
        (dict(base, mode="tcp", detect="auto"), "listeners[0].detect"),
        (
            dict(base, http={"max_concurrent_streams": 0}),
            "listeners[0].http.max_concurrent_streams",
        ),
        (dict(base, http={"stream_window": 1000}), "listeners[0].http.stream_window"),
    ]
    for listener, path in bad:
        with pytest.raises(ConfigError) as info:
            build_config({"listeners": [listener]})
        assert info.value.path == path, info.value


def test_standalone_serves_http1_and_http2_on_one_port(start_proxy, tmp_path):
    upstream = HttpUpstream()
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address)
    url = f"http://127.0.0.1:{port}/x"
    h1 = subprocess.run(["curl", "-sS", "-w", " %{http_version}", url], capture_output=True)
    h2 = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", " %{http_version}", url],
        capture_output=True,
    )
    assert h1.stdout == b"ok:/x:up 1.1" and h2.stdout == b"ok:/x:up 2"
    # The preface split over several writes is still HTTP/2; bytes are never lost.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for i in range(0, len(PREFACE), 5):
            sock.sendall(PREFACE[i : i + 5])
            time.sleep(0.03)
        sock.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
        assert recv_exactly(sock, 9)[3] == 0x4  # the proxy's SETTINGS: it chose HTTP/2
    upstream.close()


def test_server_first_protocol_falls_back_to_tcp(start_proxy, tmp_path):
    def banner_server(conn: socket.socket) -> None:
        conn.sendall(b"220 smtp.test ESMTP ready\r\n")
        echo_handler(conn)

    app = ThreadedServer(banner_server)
    proxy, port = start_listener(
        start_proxy, tmp_path, app.address, "    detect: auto\n    detect_timeout: 100ms\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        assert recv_exactly(sock, 27) == b"220 smtp.test ESMTP ready\r\n"
        assert time.monotonic() - started < 1.5  # the client never spoke: the timeout decided
        sock.sendall(b"EHLO client\r\n")
        assert recv_exactly(sock, 13) == b"EHLO client\r\n"
    # A client-first binary protocol is relayed byte-exact, first bytes included.
    payload = bytes(range(256)) * 64
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert recv_exactly(sock, 27).startswith(b"220")
    echo = ThreadedServer(echo_handler)
    proxy2, port2 = start_listener(start_proxy, tmp_path, echo.address, "    detect: auto\n")
    with socket.create_connection(("127.0.0.1", port2), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01" + payload)
        assert recv_exactly(sock, 3 + len(payload)) == b"\x16\x03\x01" + payload
    # HTTP still gets HTTP on the same listener.
    upstream = HttpUpstream()
    proxy3, port3 = start_listener(start_proxy, tmp_path, upstream.address, "    detect: auto\n")
    result = subprocess.run(
        ["curl", "-sS", f"http://127.0.0.1:{port3}/a"], capture_output=True, timeout=10
    )
    assert result.stdout == b"ok:/a:up"
    for server in (app, echo, upstream):
        server.close()


def test_per_port_override_makes_a_port_opaque(start_proxy, tmp_path):
    echo = ThreadedServer(echo_handler)
    port = free_port()
    proxy, _ = start_listener(
        start_proxy, tmp_path, echo.address, f"    ports: {{{port}: tcp}}\n", port=port
    )
    request = b"GET /not-parsed HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        # Relayed as bytes to an echo server: an HTTP session would have answered 400/502.
        assert recv_exactly(sock, len(request)) == request
    assert proxy.listener()["requests"] == 0
    echo.close()
