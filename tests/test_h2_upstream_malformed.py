"""An HTTP/2 upstream's malformed response (found by the h2_response fuzz target) is a 502
and a reset of that stream, never an exception inside the shared upstream session."""

from __future__ import annotations

import subprocess

import pytest
from conftest import start_listener
from h2_peer import H2Upstream


@pytest.fixture
def h2_upstream():
    server = H2Upstream()
    yield server
    server.close()


def _get(port: int, path: str) -> tuple[str, str]:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return result.stdout, result.stderr


@pytest.mark.parametrize("status", ["2x0", "20", "2000"])
def test_h2_upstream_status_not_three_digits_is_502(start_proxy, tmp_path, h2_upstream, status):
    proxy, port = start_listener(
        start_proxy, tmp_path, h2_upstream.address, "    http:\n      upstream_protocol: http2\n"
    )
    assert _get(port, f"/status?raw={status}")[0] == "502"
    # The session goes on serving: the same pooled connection answers the next request.
    assert _get(port, "/status?raw=200") == ("200", "")
    assert "Traceback" not in proxy.output, proxy.output
