"""Route timeouts (router.py's rule): a whole-response deadline counted from the request's end; streams
(an upload still arriving, a response of no set length) are bounded by silence instead, so one that
moves is never cut; gRPC calls are bounded only by an explicit route timeout."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest
from conftest import start_listener

from pyproxy.config import load_config
from pyproxy.http.router import DEFAULT_TIMEOUT, Router, build_clusters

ROUTE_1S = (
    "    http: {codec: CODEC}\n    routes:\n      - match: {prefix: /}\n        timeout: 1s\n"
)


@pytest.mark.parametrize("codec", ["fast", "h11"])
def test_an_upload_still_moving_is_not_cut_by_the_route_timeout(
    start_proxy, tmp_path, upstream, codec
):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, ROUTE_1S.replace("CODEC", codec)
    )
    body = b"u" * 40_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        for i in range(0, len(body), 2000):  # 20 pieces over ~2 s: twice the route timeout
            sock.sendall(body[i : i + 2000])
            time.sleep(0.1)
        assert time.monotonic() - started > 1.5
        response = b""
        while b"}" not in response:
            chunk = sock.recv(65536)
            assert chunk, response
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response
    echoed = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert proxy.listener()["flags"] == {}


def test_the_route_timeout_still_bounds_the_wait_for_the_response(start_proxy, tmp_path, upstream):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, ROUTE_1S.replace("CODEC", "fast")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 504")
        assert 0.9 < time.monotonic() - started < 2.5
    assert proxy.listener()["flags"] == {"UT": 1}


def test_an_upload_gone_silent_gets_408(start_proxy, tmp_path, upstream):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, ROUTE_1S.replace("CODEC", "fast")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
        started = time.monotonic()
        assert sock.recv(65536).startswith(b"HTTP/1.1 408")
        assert 0.9 < time.monotonic() - started < 2.5
    assert proxy.listener()["flags"] == {"SI": 1}


def _read_chunked_response(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the last chunk or the connection's end; True if the last chunk came."""
    response = b""
    while not response.endswith(b"\r\n0\r\n\r\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return response, False
        if not chunk:
            return response, False
        response += chunk
    return response, True


def test_a_response_stream_still_moving_is_not_cut_but_a_stalled_one_is(
    start_proxy, tmp_path, upstream
):
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, ROUTE_1S.replace("CODEC", "fast")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /drip?n=20&ms=100 HTTP/1.1\r\nHost: x\r\n\r\n")
        response, whole = _read_chunked_response(sock)
        assert whole and response.count(b"d" * 1000) == 20
        assert time.monotonic() - started > 1.8  # twice the route timeout, moving all along
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /drip?n=3&ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        response, whole = _read_chunked_response(sock)
        assert not whole and response.startswith(b"HTTP/1.1 200")
    assert proxy.listener()["flags"] == {"UT": 1}


def _router(tmp_path, body: str, mode: str = "http") -> Router:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"listeners:\n  - name: main\n    mode: {mode}\n    address: 127.0.0.1:1\n"
        f"    upstream: 127.0.0.1:2\n{body}"
    )
    config = load_config(str(path))
    return Router(config.listeners[0], config, build_clusters(config))


def test_grpc_calls_are_bounded_only_by_an_explicit_route_timeout(tmp_path):
    default = _router(tmp_path, "").default_route
    assert default is not None
    # A health Watch on an http listener must not die at the plain-HTTP default.
    assert (default.timeout, default.grpc_timeout) == (DEFAULT_TIMEOUT, 0.0)
    routes = _router(
        tmp_path,
        "    routes:\n      - match: {prefix: /a}\n        timeout: 2s\n"
        "      - match: {prefix: /b}\n        timeout: 0s\n      - match: {prefix: /}\n",
    ).routes
    assert [(r.timeout, r.grpc_timeout) for r in routes] == [
        (2.0, 2.0),
        (0.0, 0.0),
        (DEFAULT_TIMEOUT, 0.0),
    ]


def test_sole_route_is_the_route_every_request_takes(tmp_path):
    """The native pair may carry a listener only when one route takes every request."""
    plain = _router(tmp_path, "")
    assert plain.sole_route is plain.default_route is not None
    catch_all = _router(
        tmp_path, "    routes:\n      - match: {prefix: /}\n      - match: {prefix: /a}\n"
    )
    assert catch_all.sole_route is catch_all.routes[0]
    by_prefix = _router(
        tmp_path, "    routes:\n      - match: {prefix: /a}\n      - match: {prefix: /}\n"
    )
    assert by_prefix.sole_route is None
    by_host = _router(tmp_path, "    routes:\n      - match: {authority: a.example, prefix: /}\n")
    assert by_host.sole_route is None
