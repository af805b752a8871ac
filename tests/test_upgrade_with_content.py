"""An Upgrade request with content is refused (found by the http1_request fuzz target: the
fast backend ended the request at its head, so when the upgrade was declined the content
was parsed as a request of its own: a request smuggled past the upstream's framing)."""

from __future__ import annotations

import pytest
from conftest import start_listener
from test_express import Client, RawUpstream

HIDDEN = b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n"


@pytest.mark.parametrize("codec", ["fast", "h11"])
def test_upgrade_request_with_content_is_400_and_its_content_never_a_request(
    start_proxy, tmp_path, codec
):
    upstream = RawUpstream()
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, f"    http:\n      codec: {codec}\n"
    )
    client = Client(port)
    client.send(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(HIDDEN), HIDDEN)
    )
    assert client.response()[0].startswith(b"HTTP/1.1 400")
    assert Client(port).get(b"/after")[1] == b"ok:/after"  # the proxy goes on serving
    assert [r.split(b" ")[1] for r in upstream.requests] == [b"/after"], upstream.requests
