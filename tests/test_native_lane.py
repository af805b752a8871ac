"""The native lane (pyproxy/http/native_lane.py) through a real pyproxy process.

A connection pairs with its upstream after one exchange on the general path,
so every test warms up with one request (it connects, and its end pairs the
two connections) before the ones it is about. `native_requests` says which
exchanges C carried end to end; what the client and the app got says the
handovers lost nothing.
"""

from __future__ import annotations

import time

from conftest import start_listener
from test_express import Client, RawUpstream

CATCH_ALL = "    routes:\n      - match: {prefix: /}\n        timeout: %s\n"


def _paired(start_proxy, tmp_path, upstream: RawUpstream, body: str = ""):
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
    client = Client(port)
    assert client.get(b"/connect")[1] == b"ok:/connect"
    return proxy, client


def test_paired_connections_carry_plain_exchanges_in_c(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, client = _paired(start_proxy, tmp_path, upstream)
    for i in range(20):
        head, body = client.get(b"/n%d" % i, b"Keep-Alive: timeout=9\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b"ok:/n%d" % i
        assert b"connection" not in head.lower()
        assert upstream.requests[-1] == b"GET /n%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i
    client.send(b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello")
    assert client.response()[1] == b"hello"
    head, body = client.get(b"/204")
    assert head.startswith(b"HTTP/1.1 204") and body == b""
    stats = proxy.wait_for(lambda s: s["requests"] == 23)
    assert stats["native_requests"] == 22, stats  # all but the first, which paired them
    assert stats["express_requests"] == 22
    assert stats["responses"]["2xx"] == 23 and stats["flags"] == {}
    assert stats["duration"]["count"] == 23
    assert stats["stages"]["parse"]["events"] >= 2 * 22  # the C scans are on the clock
    assert stats["bytes"]["downstream_rx"] == client.sent
    assert upstream.server.connections == 1
    client.close()


def test_everything_else_is_handed_back_to_python(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, client = _paired(start_proxy, tmp_path, upstream)
    # After each handover, two plain requests: both are C's again (the general path re-pairs the
    # connection as the handed-over exchange ends), unless the upstream closed (/close).
    replies = []
    for special in (b"/pieces", b"/chunked", b"/close"):
        replies.append(client.get(special))
        replies += [client.get(b"/again"), client.get(b"/again")]
    assert replies[0][1] == b"pieces"
    assert b"chunked" in replies[3][0].lower() and replies[3][1].startswith(b"3\r\nabc")
    assert replies[6][1] == b"bye" and b"close" not in replies[6][0].lower()
    assert all(body == b"ok:/again" for _, body in replies[1::3] + replies[2::3])
    # Pipelined requests, then a request sent while one is in flight in C.
    client.send(b"GET /p1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /p2 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert [client.response()[1] for _ in range(2)] == [b"ok:/p1", b"ok:/p2"]
    client.get(b"/re-pair")
    client.send(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    time.sleep(0.1)
    client.send(b"GET /p3 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert [client.response()[1] for _ in range(2)] == [b"slow", b"ok:/p3"]
    stats = proxy.wait_for(lambda s: s["requests"] == 15)
    assert stats["responses"]["2xx"] == 15 and stats["flags"] == {}, stats
    # Both /again after /pieces and after /chunked; after /close the first /again connects
    # anew, the second is C's; /re-pair after the pipelined pair.
    assert stats["native_requests"] == 6, stats
    client.close()


def test_an_upstream_gone_mid_request_gets_the_safe_retry(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, client = _paired(start_proxy, tmp_path, upstream)
    client.send(b"GET /vanish HTTP/1.1\r\nHost: svc\r\n\r\n")
    head, _ = client.response()
    assert head.startswith(b"HTTP/1.1 503"), head  # retried once on a new connection, gone again
    assert client.get(b"/next")[1] == b"ok:/next"
    stats = proxy.wait_for(lambda s: s["requests"] == 3)
    assert sum(1 for r in upstream.requests if b"/vanish" in r) == 2
    assert stats["flags"] == {"UC": 1}, stats
    client.close()


def test_the_route_timeout_holds_in_the_native_lane(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, client = _paired(start_proxy, tmp_path, upstream, CATCH_ALL % "300ms")
    assert client.get(b"/c")[1] == b"ok:/c"
    started = time.monotonic()
    head, _ = client.get(b"/slow")
    elapsed = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 504"), head
    assert 0.3 <= elapsed < 0.7, elapsed
    stats = proxy.wait_for(lambda s: s["flags"].get("UT") == 1)
    assert stats["flags"] == {"UT": 1} and stats["native_requests"] == 1, stats
    client.close()


def test_a_paired_upstream_idle_past_its_pool_timeout_is_closed(start_proxy, tmp_path):
    upstream = RawUpstream()
    clusters = f"clusters:\n  app:\n    endpoints: [{upstream.address}]\n    idle_timeout: 300ms\n"
    body = "    routes:\n      - match: {prefix: /}\n        cluster: app\n"
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body, top=clusters)
    client = Client(port)
    for path in (b"/connect", b"/native1", b"/native2"):
        assert client.get(path)[1] == b"ok:" + path
    time.sleep(0.8)
    assert client.get(b"/later")[1] == b"ok:/later"
    assert upstream.server.connections == 2  # the first one was closed while idle
    stats = proxy.wait_for(lambda s: s["requests"] == 4)
    assert stats["native_requests"] == 2 and stats["flags"] == {}, stats
    client.close()


def test_the_lane_is_a_config_switch(start_proxy, tmp_path):
    # "python" (an older name) reads as "off".
    for lane, express, native in (("native", 4, 4), ("python", 0, 0), ("off", 0, 0)):
        upstream = RawUpstream()
        path = tmp_path / lane
        path.mkdir()
        body = f"    http:\n      express_lane: {lane}\n"
        proxy, client = _paired(start_proxy, path, upstream, body)
        for _ in range(4):
            client.get(b"/x")
        stats = proxy.wait_for(lambda s: s["requests"] == 5)
        assert (stats["express_requests"], stats["native_requests"]) == (express, native), stats
        client.close()
