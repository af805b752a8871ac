"""The native head scanner takes only origin-form targets (found by the native_scanner fuzz
target: it took ``POST ?up HTTP/1.0``, which llhttp refuses): any other form goes to
llhttp, on the Python path and in the C lane alike, and is answered 400, never relayed."""

from __future__ import annotations

from conftest import start_listener
from test_express import Client, RawUpstream


def test_target_without_leading_slash_is_400_not_relayed(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address)
    # First request of a connection: the fast codec's scanner (Python path).
    assert Client(port).get(b"?x")[0].startswith(b"HTTP/1.1 400")
    # A connection the C lane carries after pairing.
    client = Client(port)
    for path in (b"/connect", b"/pair", b"/in-c"):
        assert client.get(path)[1] == b"ok:" + path
    assert client.get(b"?y")[0].startswith(b"HTTP/1.1 400")
    assert [r.split(b" ")[1] for r in upstream.requests] == [b"/connect", b"/pair", b"/in-c"]
    assert proxy.wait_for(lambda s: s["native_requests"] >= 1)["native_requests"] >= 1
