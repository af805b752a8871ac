"""Hostile gRPC framing through a running proxy (gRPC over HTTP/2, length-prefixed messages):
each bad call ends with its grpc-status in one trailers-only HEADERS frame, moves the
rejected-input counter, never completes at the upstream, and the connection carries calls on."""

from __future__ import annotations

import pytest
from h2_peer import H2Client, H2Upstream
from hostile import module_proxy

LIMIT = 1024
INTERNAL, RESOURCE_EXHAUSTED = b"13", b"8"


def _message(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return bytes((flag,)) + size.to_bytes(4, "big") + payload


CASES = {
    # Compressed-Flag is 0 or 1 (gRPC over HTTP/2, Length-Prefixed-Message).
    "compressed-flag-2": (_message(b"x", flag=2), INTERNAL),
    "compressed-flag-255": (_message(b"x", flag=255), INTERNAL),
    "length-beyond-limit": (_message(b"x" * 10, length=LIMIT + 1), RESOURCE_EXHAUSTED),
    "length-4-gib": (_message(b"x", length=0xFFFFFFFF), RESOURCE_EXHAUSTED),
    "truncated-prefix": (b"\x00\x00\x00", INTERNAL),
    "truncated-message": (_message(b"abc", length=5), INTERNAL),
    "second-message-truncated": (_message(b"ok") + _message(b"ab", length=9), INTERNAL),
}


@pytest.fixture(scope="module")
def grpc_proxy(tmp_path_factory, h2_codec):
    upstream = H2Upstream()
    settings = (
        f"    grpc: {{max_request_message_bytes: {LIMIT}}}\n    http: {{http2_codec: {h2_codec}}}\n"
    )
    proxy, port = module_proxy(tmp_path_factory.mktemp("grpc"), "grpc", upstream.address, settings)
    client = H2Client(port)
    yield proxy, upstream, client
    client.close()
    proxy.stop()
    upstream.close()


def _call(client: H2Client, path: str, body: bytes) -> dict:
    headers = [("content-type", "application/grpc"), ("te", "trailers")]
    sid = client.request(path, "POST", headers=headers, body=body)
    (response,) = client.wait([sid])
    return response


@pytest.mark.parametrize("name", list(CASES))
def test_bad_grpc_framing_ends_the_call_with_its_status(grpc_proxy, name):
    proxy, upstream, client = grpc_proxy
    body, status = CASES[name]
    before = proxy.listener().get("rejected", {}).get("grpc_framing", 0)
    path = f"/hostile.Framing/{name}"
    response = _call(client, path, body)
    head = dict(response["headers"])
    assert response["trailers"] is None and head[b"grpc-status"] == status, response
    assert [r for r in upstream.requests if r["path"] == path] == []  # never a whole call there
    after = proxy.listener().get("rejected", {}).get("grpc_framing", 0)
    assert after == before + 1
    # The same connection carries the next call.
    ok = _call(client, "/hostile.Framing/Fine", _message(b"fine"))
    assert ok["status"] == 200 and ok["reset"] is None
    assert client.terminated is None and not client.eof
