"""HTTP/2 fields h2 lets through but HTTP/1 cannot carry (found by the h2_request and
h2_response fuzz targets): a request is refused before any upstream sees it, an upstream's
response is a 502, and the HTTP/2 session goes on serving other streams."""

from __future__ import annotations

import subprocess

import pytest
from conftest import start_listener
from h2_peer import H2Client


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


def test_h2_request_field_with_control_character_is_not_relayed(start_proxy, tmp_path, upstream):
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address)
    client = H2Client(port)
    (refused,) = client.wait([client.request("/x", headers=[("x-a", "a\x01b")])])
    # A malformed request (RFC 9113 §8.1.1): a stream error, counted as a bad header.
    assert refused["status"] is None and refused["reset"], refused
    assert proxy.listener()["rejected"] == {"header": 1}
    (served,) = client.wait([client.request("/y")])
    assert served["status"] == 200
    assert [r["path"] for r in upstream.requests] == ["/y"], upstream.requests
