"""HTTP/1.1 playbooks (tests/playbook.py): every script, byte for byte, on both lanes.

Each script runs with ``express_lane: off`` and ``express_lane: native``; the
steps assert the exact bytes each end receives, and the counters afterwards
must be the script's on either lane. Where a connection may pair (a request
after the first, all plain), ``native`` says how many requests the C pair
carried, so the native runs are known to have exercised it.
"""

from __future__ import annotations

import pytest
from playbook import (
    LANES,
    ClientCloses,
    ClientReceives,
    ClientSeesClose,
    ClientSends,
    ConnectFails,
    Nothing,
    Script,
    TimePasses,
    UpstreamCloses,
    UpstreamReceives,
    UpstreamSeesClose,
    UpstreamSends,
    play,
)


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: svc\r\n%s\r\n" % (path, extra)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def local(status: bytes, body: bytes, close: bool = False) -> bytes:
    """A reply the proxy makes itself (local_reply.py's framing)."""
    connection = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status, len(body), connection, body,
    )  # fmt: skip


def exchange(path: bytes, conn: int = -1) -> tuple:
    """One plain GET answered 200, every byte as it went."""
    return (
        ClientSends(get(path)),
        UpstreamReceives(get(path), conn),
        UpstreamSends(ok(path)),
        ClientReceives(ok(path)),
    )


def counted(requests: int, flags: dict | None = None, **responses: int) -> dict:
    """The expected snapshot: ``requests`` each finished (one duration each) with these classes."""
    return {
        "requests": requests,
        "responses": {f"{k[1:]}": v for k, v in responses.items()},
        "flags": flags or {},
        "rejected": {},
        "durations": requests,
    }


BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers\n"
UC_503 = local(b"503 Service Unavailable", BEFORE_HEADERS)
ONE_FAILED = counted(2, {"UC": 1}, _2xx=1, _5xx=1)  # the warm-up, then one answered 503 UC
WARM = exchange(b"/warm")
# A GET on the warm connection, which the app closes unanswered: the GET goes out again.
RETRIED = (
    ClientSends(get(b"/r")), UpstreamReceives(get(b"/r"), 0), UpstreamCloses(0),
    UpstreamReceives(get(b"/r"), 1),
)  # fmt: skip  # the first exchange runs in Python; at its end the connection may pair
ROUTE_100MS = {"routes": [{"match": {"prefix": "/"}, "timeout": "100ms"}]}
FAULT_ABORT = {"filters": [{"name": "fault", "config": {"abort": {"http_status": 503, "percentage": 100}}}]}  # fmt: skip
RATELIMIT_3 = {"filters": [{"name": "ratelimit", "config": {"token_bucket": {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "60s"}}}]}  # fmt: skip
RATELIMITED = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n"
    b"x-ratelimited: true\r\n\r\nlocal_rate_limited\n"
)


def lua(on: str) -> dict:
    code = f"function envoy_on_{on}(h) h:headers():add('x-lua', '1') end"
    return {"filters": [{"name": "lua", "config": {"inline_code": code}}]}


def lua_request_exchange(path: bytes) -> tuple:
    """A GET whose head a Lua filter gave one more field: it goes upstream written anew."""
    return (
        ClientSends(get(path)),
        UpstreamReceives(b"GET %s HTTP/1.1\r\nhost: svc\r\nx-lua: 1\r\n\r\n" % path),
        UpstreamSends(ok(path)),
        ClientReceives(ok(path)),
    )


def lua_response_exchange(path: bytes) -> tuple:
    """A GET whose response head a Lua filter gave one more field."""
    return (
        ClientSends(get(path)),
        UpstreamReceives(get(path)),
        UpstreamSends(ok(path)),
        ClientReceives(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-lua: 1\r\n\r\n%s" % (len(path), path)
        ),
    )


POST = b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"
CHUNKED_POST = (
    b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
)
CHUNKED_OK = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
)

# A script reads best as its exchanges: a send and its receipt to a line.
# fmt: off
SCRIPTS = [
    Script("simple GET", exchange(b"/a"), counted(1, _2xx=1)),
    Script(
        "keep-alive sequence on one upstream connection",
        WARM + exchange(b"/1") + exchange(b"/2") + exchange(b"/3"),
        counted(4, _2xx=4),
        native=3,
    ),
    Script(
        "POST with a content-length body",
        WARM + (ClientSends(POST), UpstreamReceives(POST), UpstreamSends(ok(b"got 5")),
                ClientReceives(ok(b"got 5"))),
        counted(2, _2xx=2),
        native=1,
    ),
    Script(
        "chunked request and chunked response",
        WARM + (ClientSends(CHUNKED_POST),
                UpstreamReceives(b"POST /up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n" + CHUNKED_BODY),
                UpstreamSends(CHUNKED_OK), ClientReceives(CHUNKED_OK.replace(b"Transfer-Encoding", b"transfer-encoding"))),
        counted(2, _2xx=2),
    ),
    Script(
        "a chunked response with trailers: relayed, and the upstream connection is kept",
        WARM + (
            ClientSends(get(b"/t")), UpstreamReceives(get(b"/t")),
            UpstreamSends(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"),
            ClientReceives(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"),
            Nothing(),
        ) + exchange(b"/next", 0),
        counted(3, _2xx=3),
        native=1,
    ),
    Script(
        "204 and 304 carry no body; HEAD's answer has a length and no body",
        WARM + (
            ClientSends(get(b"/204")), UpstreamReceives(get(b"/204")),
            UpstreamSends(b"HTTP/1.1 204 No Content\r\n\r\n"),
            ClientReceives(b"HTTP/1.1 204 No Content\r\n\r\n"),
            ClientSends(get(b"/304", b'If-None-Match: "v1"\r\n')),
            UpstreamReceives(get(b"/304", b'If-None-Match: "v1"\r\n')),
            UpstreamSends(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'),
            ClientReceives(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'),
            ClientSends(b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n"),
            UpstreamReceives(b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n"),
            UpstreamSends(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
            ClientReceives(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"),
            ClientSends(get(b"/after")), UpstreamReceives(get(b"/after")),
            UpstreamSends(ok()), ClientReceives(ok()),
        ),
        counted(5, _2xx=4, _3xx=1),
        native=3,
    ),
    Script(
        "pipelined requests are answered in order, one upstream request at a time",
        (
            ClientSends(get(b"/p1") + get(b"/p2") + get(b"/p3")),
            UpstreamReceives(get(b"/p1")), Nothing(),
            UpstreamSends(ok(b"1")), ClientReceives(ok(b"1")),
            UpstreamReceives(get(b"/p2")), UpstreamSends(ok(b"2")), ClientReceives(ok(b"2")),
            UpstreamReceives(get(b"/p3")), UpstreamSends(ok(b"3")), ClientReceives(ok(b"3")),
        ),
        counted(3, _2xx=3),
    ),
    Script(
        "hop-by-hop fields are dropped both ways",
        WARM + (
            ClientSends(get(b"/h", b"Connection: keep-alive\r\nKeep-Alive: 5\r\nx-end: 2\r\n")),
            UpstreamReceives(get(b"/h", b"x-end: 2\r\n")),
            UpstreamSends(ok(b"h", b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nx-kept: 1\r\n")),
            ClientReceives(ok(b"h", b"x-kept: 1\r\n")),
            # Connection naming more fields, and TE: the general path's business.
            ClientSends(get(b"/n", b"Connection: keep-alive, x-hop\r\nx-hop: 1\r\nTE: trailers\r\nx-end: 2\r\n")),
            UpstreamReceives(get(b"/n", b"x-end: 2\r\n")),
            UpstreamSends(ok(b"n", b"Connection: x-up\r\nx-up: 1\r\nx-kept: 1\r\n")),
            ClientReceives(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nx-kept: 1\r\n\r\nn"),
        ),
        counted(3, _2xx=3),
        native=1,
    ),
    Script(
        "a GET on a pooled connection the app closed before answering is retried once",
        WARM + RETRIED + (UpstreamSends(ok(b"r"), 1), ClientReceives(ok(b"r"))),
        counted(2, _2xx=2),
        connects=2,
    ),
    Script(
        "a GET whose retry also fails is answered 503 UC, not retried again",
        WARM + RETRIED + (UpstreamCloses(1), ClientReceives(UC_503)),
        ONE_FAILED,
        connects=2,
    ),
    Script(
        "a fresh connection closing before any response is not retried: 503 UC",
        (ClientSends(get(b"/r")), UpstreamReceives(get(b"/r")), UpstreamCloses(),
         ClientReceives(UC_503)),
        counted(1, {"UC": 1}, _5xx=1),
    ),
    Script(
        "a pooled connection the app closed while idle is dropped; the next request connects anew",
        WARM + (UpstreamCloses(0), Nothing()) + exchange(b"/n", 1),
        counted(2, _2xx=2),
        connects=2,
    ),
    Script(
        "no retry once a response byte came: 503 UC",
        WARM + (
            ClientSends(get(b"/r")), UpstreamReceives(get(b"/r")),
            UpstreamSends(b"HTTP/1.1 200 O"), UpstreamCloses(),
            ClientReceives(UC_503),
        ),
        ONE_FAILED,
    ),
    Script(
        "a POST on a pooled connection the app closed is not retried",
        WARM + (
            ClientSends(POST), UpstreamReceives(POST), UpstreamCloses(),
            ClientReceives(UC_503),
        ),
        ONE_FAILED,
    ),
    Script(
        "the upstream closing mid-body resets the client: UR",
        WARM + (
            ClientSends(get(b"/cut")), UpstreamReceives(get(b"/cut")),
            UpstreamSends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), UpstreamCloses(),
            ClientReceives(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), ClientSeesClose(),
        ),
        counted(2, {"UR": 1}, _2xx=2),
    ),
    Script(
        "a malformed response is a 502 UPE and the upstream connection is dropped",
        WARM + (
            ClientSends(get(b"/bad")), UpstreamReceives(get(b"/bad")),
            UpstreamSends(b"HTTP/1.1 2x0 Nope\r\n\r\n"), UpstreamSeesClose(),
            ClientReceives(local(b"502 Bad Gateway", BEFORE_HEADERS)),
        ),
        counted(2, {"UPE": 1}, _2xx=1, _5xx=1),
    ),
    Script(
        "the client closing mid-request abandons the upstream: DR",
        WARM + (
            ClientSends(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nhal"),
            UpstreamReceives(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nhal"),
            ClientCloses(), UpstreamSeesClose(),
        ),
        {**counted(2, {"DR": 1}, _2xx=1)},
    ),
    Script(
        "the route timeout answers 504 UT and closes the upstream",
        WARM + (
            ClientSends(get(b"/slow")), UpstreamReceives(get(b"/slow")), TimePasses(0.15),
            ClientReceives(local(b"504 Gateway Timeout", b"upstream request timeout\n")),
            UpstreamSeesClose(),
        ),
        counted(2, {"UT": 1}, _2xx=1, _5xx=1),
        listener=ROUTE_100MS,
    ),
    Script(
        "Connection: close is answered with it and the connection closes",
        WARM + (
            ClientSends(get(b"/last", b"Connection: close\r\n")),
            UpstreamReceives(get(b"/last")),
            UpstreamSends(ok()), ClientReceives(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"),
            ClientSeesClose(),
        ),
        counted(2, _2xx=2),
    ),
    Script(
        "Expect: 100-continue: the interim response is relayed, then the body",
        WARM + (
            ClientSends(b"POST /e HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            UpstreamReceives(b"POST /e HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            UpstreamSends(b"HTTP/1.1 100 Continue\r\n\r\n"),
            ClientReceives(b"HTTP/1.1 100 Continue\r\n\r\n"),
            ClientSends(b"hello"), UpstreamReceives(b"hello"),
            UpstreamSends(ok(b"e")), ClientReceives(ok(b"e")),
        ),
        counted(2, _2xx=2),
    ),
    Script(
        "a head over max_header_bytes is refused 431 and the connection closes",
        (ClientSends(get(b"/big", b"x-big: " + b"b" * 2000 + b"\r\n")),
         ClientReceives(local(b"431 Request Header Fields Too Large", b"header section over limits\n", close=True)),
         ClientSeesClose()),
        {**counted(0, {"DPE": 1}, _4xx=1), "durations": 0, "rejected": {"too_large": 1}},
        listener={"http": {"max_header_bytes": 1024}},
        connects=0,
    ),
    Script(
        "a bad request line is a 400 and the connection closes",
        WARM + (
            ClientSends(b"GET /a b HTTP/1.1\r\nHost: svc\r\n\r\n"),
            ClientReceives(local(b"400 Bad Request", b"Expected HTTP/, RTSP/ or ICE/\n", close=True)),
            ClientSeesClose(),
        ),
        {**counted(1, {"DPE": 1}, _2xx=1, _4xx=1), "rejected": {"request_line": 1}},
    ),
    Script(
        "an upgrade becomes a tunnel: bytes go both ways unparsed",
        WARM + (
            ClientSends(get(b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n")),
            UpstreamReceives(b"GET /ws HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"),
            UpstreamSends(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            ClientReceives(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"),
            ClientSends(b"\x81\x02hi"), UpstreamReceives(b"\x81\x02hi"),
            UpstreamSends(b"\x81\x02yo"), ClientReceives(b"\x81\x02yo"),
            UpstreamCloses(), ClientSeesClose(),
        ),
        # The tunnel, a byte relay once switched, observes its own duration as it ends.
        {**counted(2, _2xx=1, _1xx=1), "durations": 3},
    ),
    Script(
        "a filter answers locally (fault abort): 503 FI, nothing goes upstream",
        (
            ClientSends(get(b"/f")),
            ClientReceives(local(b"503 Service Unavailable", b"fault filter abort\n")),
            ClientSends(get(b"/g")),
            ClientReceives(local(b"503 Service Unavailable", b"fault filter abort\n")),
        ),
        counted(2, {"FI": 2}, _5xx=2),
        listener=FAULT_ABORT,
        connects=0,
    ),
    Script(
        "a rate limit on a paired connection: two requests go from C, the limited are taken",
        WARM + exchange(b"/1") + exchange(b"/2")
        + (ClientSends(get(b"/3")), ClientReceives(RATELIMITED))
        + (ClientSends(get(b"/4")), ClientReceives(RATELIMITED)),
        counted(5, {"RL": 2}, _2xx=3, _4xx=2),
        listener=RATELIMIT_3,
        native=2,
    ),
    Script(
        "a Lua request-header filter on a paired connection: C sends the head it wrote",
        lua_request_exchange(b"/warm") + lua_request_exchange(b"/1") + lua_request_exchange(b"/2"),
        counted(3, _2xx=3),
        listener=lua("request"),
        native=2,
    ),
    Script(
        "a Lua response-header filter on a paired connection: C sends the head it wrote",
        lua_response_exchange(b"/warm") + lua_response_exchange(b"/1") + lua_response_exchange(b"/2"),
        counted(3, _2xx=3),
        listener=lua("response"),
        native=2,
    ),
    Script(
        "a request pipelined behind a filter's local reply is answered too",
        (ClientSends(get(b"/f") + get(b"/g")),
         ClientReceives(local(b"503 Service Unavailable", b"fault filter abort\n") * 2)),
        counted(2, {"FI": 2}, _5xx=2),
        listener=FAULT_ABORT,
        connects=0,
    ),
    Script(
        "the client half-closing after a whole request is answered, then closed",
        WARM + (
            ClientSends(get(b"/bye")), ClientCloses(half=True),
            UpstreamReceives(get(b"/bye")), UpstreamSends(ok()),
            ClientReceives(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"), ClientSeesClose(),
        ),
        counted(2, _2xx=2),
    ),
    Script(
        "a head that stalls past request_header_timeout is answered 408",
        (ClientSends(b"GET /slow HTTP/1.1\r\nHo"), TimePasses(0.15),
         ClientReceives(local(b"408 Request Timeout", b"request header timeout\n", close=True)),
         ClientSeesClose()),
        {**counted(0, {"DT": 1}, _4xx=1), "durations": 0},
        listener={"http": {"request_header_timeout": "100ms"}},
        connects=0,
    ),
    Script(
        "a request body in pieces is relayed as it comes (the C pair hands it over)",
        WARM + (
            ClientSends(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nhello"),
            UpstreamReceives(b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nhello"),
            ClientSends(b"world"), UpstreamReceives(b"world"),
            UpstreamSends(ok()), ClientReceives(ok()),
        ) + exchange(b"/again"),
        counted(3, _2xx=3),
        native=1,
    ),
    Script(
        "a response in pieces is relayed as it comes",
        WARM + (
            ClientSends(get(b"/slow")), UpstreamReceives(get(b"/slow")),
            UpstreamSends(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
            ClientReceives(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
            UpstreamSends(b"world"), ClientReceives(b"world"),
        ) + exchange(b"/again"),
        counted(3, _2xx=3),
        native=1,
    ),
    Script(
        "an HTTP/1.0 request goes upstream as 1.1 and its answer closes the connection",
        (ClientSends(b"GET /old HTTP/1.0\r\nHost: svc\r\n\r\n"),
         UpstreamReceives(b"GET /old HTTP/1.1\r\nhost: svc\r\n\r\n"),
         UpstreamSends(ok()),
         ClientReceives(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"),
         ClientSeesClose()),
        counted(1, _2xx=1),
    ),
    Script(
        "CONNECT is not relayed: 501",
        (ClientSends(b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n"),
         ClientReceives(local(b"501 Not Implemented", b"CONNECT is not relayed\n", close=True)),
         ClientSeesClose()),
        {**counted(0, {"DPE": 1}, _5xx=1), "rejected": {"method": 1}},
        connects=0,
    ),
    Script(
        "Content-Length with Transfer-Encoding (a smuggling shape) is a 400, never relayed",
        WARM + (
            ClientSends(b"POST /s HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            ClientReceives(local(b"400 Bad Request", b"Transfer-Encoding can't be present with Content-Length\n", close=True)),
            ClientSeesClose(),
        ),
        {**counted(1, {"DPE": 1}, _2xx=1, _4xx=1), "rejected": {"framing": 1}},
    ),
    Script(
        "a request without Host is a 400",
        (ClientSends(b"GET /a HTTP/1.1\r\n\r\n"),
         ClientReceives(local(b"400 Bad Request", b"missing or repeated Host\n", close=True)),
         ClientSeesClose()),
        {**counted(0, {"DPE": 1}, _4xx=1), "rejected": {"header": 1}},
        connects=0,
    ),
    Script(
        "a refused upstream connect is a 503 UF; the connection stays open for the next request",
        (
            ConnectFails(), ClientSends(get(b"/x")),
            ClientReceives(local(b"503 Service Unavailable", b"upstream connect error\n")),
        ) + exchange(b"/y"),
        counted(2, {"UF": 1}, _2xx=1, _5xx=1),
    ),
    Script(
        "a response without a length is read to the upstream's close",
        WARM + (
            ClientSends(get(b"/eof")), UpstreamReceives(get(b"/eof")),
            UpstreamSends(b"HTTP/1.1 200 OK\r\n\r\nuntil close"), UpstreamCloses(),
            ClientReceives(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nb\r\nuntil close\r\n0\r\n\r\n"),
        ),
        counted(2, _2xx=2),
    ),
]
# fmt: on


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script(script: Script, lane: str):
    outcome = play(script, lane)
    counters = {k: v for k, v in outcome.counters.items() if k != "bytes"}
    assert counters == script.counters
    assert outcome.connects == script.connects
    assert outcome.native == (script.native if lane == "native" else 0)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_lanes_agree(script: Script):
    """Bytes on the wire included: the C pair is a faster engine for the same rules."""
    off, native = (play(script, lane).counters for lane in LANES)
    assert off == native
