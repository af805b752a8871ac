"""An upstream that answers badly: the request it got is never sent a second time."""

from __future__ import annotations

import pytest
from conftest import http_get, start_listener
from test_express import RawUpstream


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_protocol_error_after_response_bytes_is_answered_502_once_never_retried(
    start_proxy, tmp_path, method
):
    upstream = RawUpstream()
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address)
    assert http_get(f"http://127.0.0.1:{port}/warm")[0] == 200  # the pool now has a connection
    status, _ = http_get(f"http://127.0.0.1:{port}/both-framings", method=method)
    assert status == 502
    sent = [r.split(b"\r\n")[0] for r in upstream.requests if b"/both-framings" in r]
    assert sent == [method.encode() + b" /both-framings HTTP/1.1"]
    snap = proxy.wait_for(lambda s: s["flags"].get("UPE") == 1)
    assert snap["flags"].get("UPE") == 1, snap
    assert http_get(f"http://127.0.0.1:{port}/after")[0] == 200
    upstream.server.close()
