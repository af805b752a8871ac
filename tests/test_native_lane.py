"""The native lane (pyproxy/http/native_lane.py) through a real pyproxy process.

A connection pairs with its upstream after one exchange on the general path,
so every test warms up with one request (it connects, and its end pairs the
two connections) before the ones it is about. `native_requests` says which
exchanges C carried end to end; what the client and the app got says the
handovers lost nothing.
"""

from __future__ import annotations

import subprocess
import time

from conftest import start_listener
from test_express import Client, RawUpstream

from pyproxy.http.native_lane import RequestLater

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


# ---- routes with filters of heads only: the pair runs them (native_lane.py's hooks) -----------
# Each script runs twice, paired (`express_lane: native`) and on the general path (`off`): the
# client and the app must see the same bytes, and the listener the same counters.

RATELIMIT = (
    "      - name: rl\n        type: ratelimit\n"
    "        config: {token_bucket: {max_tokens: 3, tokens_per_fill: 1, fill_interval: 60s}}\n"
)


def _lua(name: str, code: str) -> str:
    lines = "".join(f"            {line}\n" for line in code.strip().splitlines())
    return f"      - name: {name}\n        type: lua\n        config:\n          inline_code: |\n{lines}"


def lane_listener(start_proxy, tmp_path, lane: str, filters: str, routes: str = "", upstream=None):
    """``upstream`` (a new RawUpstream if None), a proxy in front of it with ``express_lane:
    lane`` (in its own folder under ``tmp_path``) and a client connection to it."""
    upstream = upstream if upstream is not None else RawUpstream()
    path = tmp_path / lane
    path.mkdir()
    body = f"    http:\n      express_lane: {lane}\n{routes}    filters:\n{filters}"
    proxy, port = start_listener(start_proxy, path, upstream.address, body)
    return upstream, proxy, Client(port)


def _both_lanes(start_proxy, tmp_path, filters: str, script, routes: str = "", fold_case=False):
    """Run ``script(client)`` on one connection per lane; returns {lane: (replies, sent, stats)}.
    ``fold_case``: compare heads in lower case (the general path writes a head its response
    filters saw with lower-case names, the pair forwards one they left unchanged as read)."""
    runs = {}
    for lane in ("native", "off"):
        upstream, proxy, client = lane_listener(start_proxy, tmp_path, lane, filters, routes)
        replies = script(client)
        count = len(replies)
        stats = proxy.wait_for(lambda s: s["requests"] == count)  # noqa: B023 (used at once)
        client.close()
        sent = upstream.requests
        if fold_case:
            replies = [(head.lower(), body) for head, body in replies]
            sent = [_head_lowered(request) for request in sent]
        runs[lane] = (replies, sent, stats)
    native, general = runs["native"], runs["off"]
    assert native[0] == general[0]  # what the client got
    assert native[1] == general[1]  # what the app got
    for key in ("requests", "responses", "flags", "filters"):
        assert native[2][key] == general[2][key], key
    assert native[2]["duration"]["count"] == general[2]["duration"]["count"]
    assert general[2]["native_requests"] == 0
    return runs


def _head_lowered(message: bytes) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    return head.lower() + b"\r\n\r\n" + body


def test_a_rate_limit_that_limits_answers_429_from_the_pair(start_proxy, tmp_path):
    def script(client):
        return [client.get(b"/r%d" % i) for i in range(6)]

    runs = _both_lanes(start_proxy, tmp_path, RATELIMIT, script)
    replies, sent, stats = runs["native"]
    assert [head.split(b" ")[1] for head, _ in replies] == [b"200"] * 3 + [b"429"] * 3
    assert all(b"x-ratelimited: true" in head.lower() for head, _ in replies[3:])
    assert len(sent) == 3 and stats["flags"] == {"RL": 3}
    assert stats["filters"]["rl"] == {"allowed": 3, "limited": 3}
    # Two went through in C; each limited one is taken by the general path, which answers
    # and pairs the connection again.
    assert stats["native_requests"] == 2, stats
    assert stats["stages"]["filter:rl"]["events"] == 6


def test_lua_request_headers_added_and_removed_reach_the_app(start_proxy, tmp_path):
    code = """
function envoy_on_request(h)
  h:headers():add('x-added', 'yes')
  h:headers():remove('x-gone')
end
"""

    def script(client):
        replies = [client.get(b"/h%d" % i, b"X-Gone: 1\r\nX-Kept: 2\r\n") for i in range(4)]
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: svc\r\nX-Gone: 1\r\nContent-Length: 5\r\n\r\nhello"
        )
        return replies + [client.response()]

    replies, sent, stats = _both_lanes(start_proxy, tmp_path, _lua("edit", code), script)["native"]
    assert replies[-1][1] == b"hello"
    for request in sent:
        lowered = request.lower()
        assert b"x-added: yes\r\n" in lowered and b"x-gone" not in lowered
    assert sent[-1].endswith(b"content-length: 5\r\nx-added: yes\r\n\r\nhello")
    assert b"x-kept: 2" in sent[1].lower()
    assert stats["native_requests"] == 4, stats  # all but the first, rewritten heads included


def test_a_lua_response_header_reaches_curl_from_the_pair(start_proxy, tmp_path):
    upstream = RawUpstream()
    code = "function envoy_on_response(h)\n  h:headers():add('x-lua-response', 'stamped')\nend\n"
    body = "    filters:\n" + _lua("stamp", code)
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
    urls = [f"http://127.0.0.1:{port}/c{i}" for i in range(5)]
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-D", "-", *urls], capture_output=True, timeout=15
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.lower()
    assert out.count(b"x-lua-response: stamped") == 5 and out.count(b"http/1.1 200") == 5
    for i in range(5):
        assert b"ok:/c%d" % i in out
    stats = proxy.wait_for(lambda s: s["requests"] == 5)
    assert stats["native_requests"] == 4 and stats["connections_total"] == 1, stats


def test_a_lua_respond_from_the_request_hook_is_sent_by_the_general_path(start_proxy, tmp_path):
    code = """
function envoy_on_request(h)
  if h:headers():get('x-deny') then
    h:respond({[':status'] = '403', ['x-why'] = 'denied'}, 'no\\n')
  end
end
"""

    def script(client):
        replies = []
        for path, extra in ((b"/warm", b""), (b"/d1", b"X-Deny: 1\r\n"), (b"/ok1", b""),
                            (b"/d2", b"X-Deny: 1\r\n"), (b"/ok2", b"")):  # fmt: skip
            replies.append(client.get(path, extra))
        return replies

    replies, sent, stats = _both_lanes(start_proxy, tmp_path, _lua("deny", code), script)["native"]
    assert replies[1][0].startswith(b"HTTP/1.1 403") and b"x-why: denied" in replies[1][0].lower()
    assert replies[1][1] == b"no\n" and replies[4][1] == b"ok:/ok2"
    assert [r.split(b" ")[1] for r in sent] == [b"/warm", b"/ok1", b"/ok2"]
    assert stats["responses"]["4xx"] == 2 and stats["flags"] == {"LR": 2}, stats
    assert stats["native_requests"] == 2, stats  # the connection pairs again after each answer


def test_a_request_head_the_pair_cannot_write_is_taken_with_its_body_and_filters_run_once(
    start_proxy, tmp_path
):
    # The chain has no response filter, so the request hook lets go of it at once; taken
    # after that, the request (head and body) still goes through it exactly once.
    code = """
function envoy_on_request(h)
  h:headers():add('x-seen', 'once')
  if h:headers():get(':path') == '/named' then
    h:headers():add('connection', 'x-drop')
    h:headers():add('x-drop', '1')
  end
end
"""

    def script(client):
        replies = []
        for path in (b"/warm", b"/named", b"/plain"):
            client.send(b"POST %s HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc" % path)
            replies.append(client.response())
        return replies

    replies, sent, stats = _both_lanes(start_proxy, tmp_path, _lua("named", code), script)["native"]
    assert [r.split(b" ")[1] for r in sent] == [b"/warm", b"/named", b"/plain"]
    assert all(r.lower().count(b"x-seen: once") == 1 and r.endswith(b"abc") for r in sent)
    assert b"x-drop" not in sent[1].lower()  # named by Connection: hop-by-hop, stripped
    assert stats["native_requests"] == 1, stats  # /plain; /named was taken
    assert stats["stages"]["filter:named"]["events"] == 3  # one request pass each


def test_response_heads_the_pair_cannot_frame_are_taken_with_their_filters_run_once(
    start_proxy, tmp_path
):
    # Without Content-Length the general path sends chunked; a new status goes its way too.
    code = """
function envoy_on_response(h)
  h:headers():add('x-seen', 'once')
  if h:headers():get(':status') == '204' then
    h:headers():replace(':status', '200')
  elseif h:headers():get('content-length') == '6' then
    h:headers():remove('content-length')
  end
end
"""

    def script(client):
        return [client.get(p) for p in (b"/warm", b"/rm", b"/204", b"/plain")]

    runs = _both_lanes(start_proxy, tmp_path, _lua("reframe", code), script)
    replies, _, stats = runs["native"]
    assert b"transfer-encoding: chunked" in replies[1][0].lower() and replies[1][1].startswith(
        b"6\r\nok:/rm"
    )
    assert replies[2][0].startswith(b"HTTP/1.1 200")
    assert all(head.lower().count(b"x-seen: once") == 1 for head, _ in replies)
    assert stats["native_requests"] == 1, stats  # /plain; the other two were taken
    assert stats["stages"]["filter:reframe"]["events"] == 4  # one response pass each


def test_a_filter_that_waits_for_the_body_takes_each_request_to_the_general_path(
    start_proxy, tmp_path
):
    code = """
function envoy_on_request(h)
  h:headers():add('x-length', tostring(h:body():length()))
end
"""

    def script(client):
        replies = []
        for _ in range(3):
            client.send(b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
            replies.append(client.response())
        return replies

    replies, sent, stats = _both_lanes(start_proxy, tmp_path, _lua("body", code), script)["native"]
    assert all(body == b"abc" for _, body in replies)
    assert all(b"x-length: 3" in request.lower() for request in sent)
    assert stats["native_requests"] == 0 and stats["express_requests"] == 0, stats


def _handed_over_in_flight(start_proxy, tmp_path, name: str, code: str):
    """/pieces, /chunked and /slow (past a 300 ms route timeout: 504) go upstream from C and
    come back mid-flight; each response carries x-response-pass once. (sent, stats)."""

    def script(client):
        return [client.get(p) for p in (b"/warm", b"/pieces", b"/chunked", b"/slow", b"/after")]

    runs = _both_lanes(start_proxy, tmp_path, _lua(name, code), script, routes=CATCH_ALL % "300ms")
    replies, sent, stats = runs["native"]
    assert replies[1][1] == b"pieces" and replies[2][1].startswith(b"3\r\nabc")
    assert replies[3][0].startswith(b"HTTP/1.1 504") and replies[4][1] == b"ok:/after"
    for head, _ in replies[:3] + replies[4:]:
        assert head.lower().count(b"x-response-pass: once") == 1
    assert stats["flags"] == {"UT": 1}, stats
    return sent, stats


def test_handovers_in_flight_carry_the_chain_on(start_proxy, tmp_path):
    code = """
function envoy_on_request(h)
  h:headers():add('x-request-pass', 'once')
end
function envoy_on_response(h)
  h:headers():add('x-response-pass', 'once')
end
"""

    sent, stats = _handed_over_in_flight(start_proxy, tmp_path, "both", code)
    assert all(request.lower().count(b"x-request-pass: once") == 1 for request in sent)
    # /pieces, /chunked and /slow went upstream from C, then came back mid-flight.
    assert stats["native_requests"] == 0 and stats["express_requests"] == 0, stats


# A chain with response-header filters only starts at the response (the pair calls no request
# hook), or where an Exchange adopts the request in flight: what its filters see is the same.

RESPONSE_READS = """
function envoy_on_response(h)
  local info = h:streamInfo()
  h:headers():add('x-protocol', info:protocol())
  h:headers():add('x-owner', h:metadata():get('owner') or 'none')
  h:headers():add('x-tier', h:route():metadata():get('tier') or 'none')
  h:headers():add('x-peer-seen', info:downstreamRemoteAddress() and 'yes' or 'no')
  h:headers():add('x-status', h:headers():get(':status'))
end
"""
TAGGED_ROUTE = (
    "    routes:\n      - match: {prefix: /}\n"
    "        metadata: {reads: {owner: team-a, tier: gold}}\n"
)


def test_a_response_only_chain_reads_the_route_and_stream_on_the_response(start_proxy, tmp_path):
    def script(client):
        return [client.get(b"/r%d" % i) for i in range(5)]

    runs = _both_lanes(
        start_proxy, tmp_path, _lua("reads", RESPONSE_READS), script, routes=TAGGED_ROUTE
    )
    replies, sent, stats = runs["native"]
    for head, _ in replies:
        lowered = head.lower()
        for field in (b"x-protocol: http/1.1", b"x-owner: team-a", b"x-tier: gold",
                      b"x-peer-seen: yes", b"x-status: 200"):  # fmt: skip
            assert lowered.count(field) == 1, (field, head)
    assert [r.split(b" ")[1] for r in sent] == [b"/r%d" % i for i in range(5)]
    assert stats["native_requests"] == 4, stats  # all but the first came through C
    assert stats["stages"]["filter:reads"]["events"] == 5


def test_a_response_only_chain_handed_over_in_flight_runs_once(start_proxy, tmp_path):
    # The pair hands these over after sending the request, before any response hook: the
    # Exchange that carries each on starts its chain, and the response filter runs once.
    code = "function envoy_on_response(h)\n  h:headers():add('x-response-pass', 'once')\nend\n"

    _, stats = _handed_over_in_flight(start_proxy, tmp_path, "late", code)
    assert stats["native_requests"] == 0, stats
    assert stats["stages"]["filter:late"]["events"] == 4  # the 504 is a local reply


def test_a_late_chain_builds_the_request_header_map_from_the_request_as_read():
    raw = (
        b"GET /a/b?q=1 HTTP/1.1\r\nHost: svc:8080\r\nUser-Agent: t\r\nX-Two: 1\r\nx-two: 2\r\n\r\n"
    )
    maps = RequestLater()
    maps.request = raw
    assert "decode" not in maps  # nothing built until read
    headers = maps.get("decode")
    assert headers is maps["decode"] and not headers.changed
    assert headers.pseudo == {b":method": b"GET", b":path": b"/a/b?q=1", b":authority": b"svc:8080"}
    assert headers.headers == [
        (b"host", b"svc:8080"), (b"user-agent", b"t"), (b"x-two", b"1"), (b"x-two", b"2"),
    ]  # fmt: skip
    assert maps.get("encode") is None
