"""SIGHUP reload drains connections opened before it onto the new config, within drain_timeout."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import free_port, require_capability
from h2_peer import H2Client
from http_peer import HttpUpstream


@pytest.fixture
def two_apps():
    old, new = HttpUpstream("old"), HttpUpstream("new")
    yield old, new
    old.close()
    new.close()


def _write_config(path, port: int, upstream: str) -> None:
    path.write_text(
        "drain_timeout: 1s\nlisteners:\n  - name: main\n    mode: http\n"
        f"    address: 127.0.0.1:{port}\n    upstream: {upstream}\n"
    )


def _reload_onto(proxy, path, port: int, upstream: str) -> None:
    _write_config(path, port, upstream)
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reloaded" not in proxy.output:
        assert time.monotonic() < deadline, proxy.output
        time.sleep(0.02)


def _get(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET; the whole response (its body is short and length-framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith((b":old", b":new")):
        chunk = sock.recv(65536)
        assert chunk, response
        response += chunk
    return response


def _proxy(start_proxy, tmp_path, upstream: str):
    path, port = tmp_path / "proxy.yaml", free_port()
    _write_config(path, port, upstream)
    return start_proxy("-c", str(path)), path, port


def test_http1_keepalive_moves_to_the_new_config_after_its_next_response(
    start_proxy, tmp_path, two_apps
):
    old, new = two_apps
    proxy, path, port = _proxy(start_proxy, tmp_path, old.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert _get(sock, "/a").endswith(b"ok:/a:old")
        _reload_onto(proxy, path, port, new.address)
        # The request after the reload is still answered on this connection, which then closes...
        last = _get(sock, "/b")
        assert last.endswith(b"ok:/b:old") and b"\r\nconnection: close\r\n" in last.lower()
        assert sock.recv(10) == b""
    # ...and the client's new connection is on the new config.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert _get(sock, "/c").endswith(b"ok:/c:new")


def test_an_idle_keepalive_connection_is_closed_within_the_drain_bound(
    start_proxy, tmp_path, two_apps
):
    old, new = two_apps
    proxy, path, port = _proxy(start_proxy, tmp_path, old.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert _get(sock, "/a").endswith(b"ok:/a:old")
        _reload_onto(proxy, path, port, new.address)
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 2.5  # drain_timeout is 1s


def test_http2_connection_gets_goaway_on_reload_and_its_streams_finish(
    start_proxy, tmp_path, two_apps
):
    require_capability(
        "nghttp (nghttp2-client; make test installs it)", shutil.which("nghttp") is not None
    )
    old, new = two_apps
    proxy, path, port = _proxy(start_proxy, tmp_path, old.address)
    run = subprocess.Popen(
        ["nghttp", "-v", "-t", "10", f"http://127.0.0.1:{port}/slow?ms=600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while proxy.listener()["requests"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _reload_onto(proxy, path, port, new.address)
    out, _ = run.communicate(timeout=15)
    assert "recv GOAWAY frame" in out and "NO_ERROR" in out, out
    assert ":status: 200" in out and "slow" in out, out
    retry = H2Client(port)
    try:
        (response,) = retry.wait([retry.request("/d")])
        assert bytes(response["body"]) == b"ok:/d:new"
    finally:
        retry.close()
