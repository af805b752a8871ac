"""Conformance tests for the HTTP/1 codec: every backend must give the same events for the same bytes."""

from __future__ import annotations

import random

import pytest

from pyproxy.codec.events import (
    END,
    PAUSED,
    Body,
    End,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Trailers,
)
from pyproxy.codec.http1 import (
    CLOSED,
    DEFAULT_LIMITS,
    DONE,
    ERROR,
    IDLE,
    MIGHT_SWITCH_PROTOCOL,
    MUST_CLOSE,
    SWITCHED_PROTOCOL,
    CodecUsageError,
    Http1Codec,
    Http1Limits,
    strip_hop_by_hop,
)
from pyproxy.codec.http1_backend import make_http1_codec
from pyproxy.codec.http1_fast import FastHttp1Codec

# "fast-llhttp" is the fast backend with its native head scanner off: every head goes
# through llhttp, as on a host without the native module.
BACKENDS = ["fast", "fast-llhttp", "h11"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def make(backend: str, role: str, limits: Http1Limits = DEFAULT_LIMITS) -> Http1Codec:
    if backend == "fast-llhttp":
        return FastHttp1Codec(role, limits, native_scan=False)  # type: ignore[arg-type]
    return make_http1_codec(backend, role, limits)  # type: ignore[arg-type]


def server(backend: str, **limits: int) -> Http1Codec:
    return make(backend, "server", Http1Limits(**limits))


def client(backend: str, method: bytes = b"GET", **limits: int) -> Http1Codec:
    c = make(backend, "client", Http1Limits(**limits))
    c.send(RequestHead(method, b"/", [(b"host", b"up")]))
    c.send(END)
    return c


def normalise(events: list) -> list:
    """Merge adjacent Body events and drop PAUSED, so differently split feeds compare equal."""
    out: list = []
    for ev in events:
        if ev is PAUSED:
            continue
        if type(ev) is Body:
            if out and type(out[-1]) is Body:
                out[-1] = Body(bytes(out[-1].data) + bytes(ev.data))
            else:
                out.append(Body(bytes(ev.data)))
        else:
            out.append(ev)
    return out


def feed(codec: Http1Codec, data: bytes, pieces: list[int] | None = None) -> list:
    if pieces is None:
        return codec.receive_data(data)
    events: list = []
    pos = 0
    for size in pieces:
        events += codec.receive_data(data[pos : pos + size])
        pos += size
    events += codec.receive_data(data[pos:])
    return events


def random_pieces(rng: random.Random, n: int) -> list[int]:
    pieces, total = [], 0
    while total < n:
        size = rng.randint(1, 17)
        pieces.append(size)
        total += size
    return pieces


def respond(codec: Http1Codec, body: bytes = b"ok", headers: list | None = None) -> bytes:
    hdrs = [(b"content-length", str(len(body)).encode())] if headers is None else headers
    out = bytes(codec.send(ResponseHead(200, b"OK", hdrs)))
    out += bytes(codec.send(Body(body)))
    out += bytes(codec.send(END))
    return out


def heads(events: list) -> list:
    return [e for e in events if type(e) in (RequestHead, ResponseHead)]


def error_of(events: list) -> ProtocolError:
    errors = [e for e in events if type(e) is ProtocolError]
    assert errors, f"expected a ProtocolError in {events}"
    return errors[0]


GET = b"GET /a HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\n\r\n"


# --- heads, keep-alive -------------------------------------------------------


def test_request_head_fields_and_lowercased_names(backend: str) -> None:
    events = server(backend).receive_data(
        b"POST /p?q=1 HTTP/1.1\r\nHost: svc\r\nX-Mixed-Case: V a l\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert events == [
        RequestHead(
            b"POST",
            b"/p?q=1",
            [(b"host", b"svc"), (b"x-mixed-case", b"V a l"), (b"content-length", b"3")],
            b"1.1",
            True,
            3,
            False,
            False,
            False,
        ),
        Body(b"abc"),
        End(),
    ]


def test_http11_keeps_alive_by_default(backend: str) -> None:
    s = server(backend)
    s.receive_data(GET)
    respond(s)
    assert (s.their_state, s.our_state, s.keep_alive) == (DONE, DONE, True)
    s.start_next_cycle()
    assert (s.their_state, s.our_state) == (IDLE, IDLE)
    assert heads(s.receive_data(GET))[0].target == b"/a"


def test_connection_close_ends_the_connection(backend: str) -> None:
    s = server(backend)
    s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    out = respond(s)
    assert b"connection: close" in out.lower()
    assert (s.their_state, s.our_state) == (MUST_CLOSE, MUST_CLOSE)
    with pytest.raises(CodecUsageError):
        s.start_next_cycle()


def test_http10_without_keep_alive_closes(backend: str) -> None:
    s = server(backend)
    [head, _] = s.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert (head.http_version, head.keep_alive) == (b"1.0", False)
    respond(s)
    assert s.our_state == MUST_CLOSE


def test_http10_keep_alive_is_honoured_and_announced(backend: str) -> None:
    s = server(backend)
    s.receive_data(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    out = respond(s)
    assert b"connection: keep-alive" in out.lower() and b"close" not in out.lower()
    assert (s.their_state, s.our_state) == (DONE, DONE)
    s.start_next_cycle()
    assert (
        heads(s.receive_data(b"GET /2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))[0].target
        == b"/2"
    )


def test_client_sees_http10_keep_alive_response(backend: str) -> None:
    c = client(backend)
    events = c.receive_data(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx"
    )
    assert normalise(events)[1:] == [Body(b"x"), End()]
    assert (c.their_state, c.our_state) == (DONE, DONE)
    c.start_next_cycle()
    c.send(RequestHead(b"GET", b"/2", [(b"host", b"up")]))
    c.send(END)
    assert heads(c.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n"))[0].status == 204


# --- pipelining --------------------------------------------------------------


def test_pipelined_requests_come_out_one_cycle_at_a_time(backend: str) -> None:
    s = server(backend)
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    first = s.receive_data(data)
    assert [type(e) for e in first] == [RequestHead, End, type(PAUSED)]
    assert first[0].target == b"/1"
    # Nothing of the next cycle leaks while the response is pending.
    assert s.receive_data(b"") == [PAUSED]
    seen = [b"/1"]
    for _ in range(2):
        respond(s)
        s.start_next_cycle()
        events = normalise(s.receive_data(b""))
        seen.append(events[0].target)
        if events[0].target == b"/2":
            assert events[1:] == [Body(b"hello"), End()]
    assert seen == [b"/1", b"/2", b"/3"]
    respond(s)
    s.start_next_cycle()
    assert s.receive_data(b"") == []


def test_pipelined_bytes_split_across_reads(backend: str) -> None:
    s = server(backend)
    data = GET + b"GET /b HTTP/1.1\r\nHo"
    assert heads(s.receive_data(data))[0].target == b"/a"
    s.receive_data(b"st: a\r\n\r\n")
    respond(s)
    s.start_next_cycle()
    assert heads(s.receive_data(b""))[0].target == b"/b"


# --- bodies ------------------------------------------------------------------

CHUNKED_REQ = (
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


def test_chunked_request_is_dechunked(backend: str) -> None:
    events = normalise(server(backend).receive_data(CHUNKED_REQ))
    assert events[0].chunked and events[0].content_length is None
    assert events[1:] == [Body(b"hello world"), End()]


def test_chunked_response_is_dechunked(backend: str) -> None:
    c = client(backend)
    events = c.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert normalise(events)[1:] == [Body(b"abc"), End()]


def test_trailers_are_surfaced_by_both_backends(backend: str) -> None:
    # httptools 0.9 reports trailer fields through on_header after the last
    # chunk, so the fast backend matches h11 here.
    events = server(backend).receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\nGrpc-Status: 0\r\nX-T: y\r\n\r\n"
    )
    assert normalise(events)[1:] == [
        Body(b"x"),
        Trailers([(b"grpc-status", b"0"), (b"x-t", b"y")]),
        End(),
    ]


def test_response_without_length_reads_until_close(backend: str) -> None:
    c = client(backend)
    events = c.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc")
    events += c.receive_data(b"def")
    assert not any(type(e) is End for e in events)
    assert heads(events)[0].keep_alive is False
    events += c.receive_eof()
    assert normalise(events)[1:] == [Body(b"abcdef"), End()]
    assert c.their_state == MUST_CLOSE


def test_eof_mid_body_is_a_reset(backend: str) -> None:
    s = server(backend)
    s.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert [type(e) for e in s.receive_eof()] == [Reset]
    assert s.their_state == ERROR


def test_eof_between_requests_closes_quietly(backend: str) -> None:
    s = server(backend)
    s.receive_data(GET)
    respond(s)
    s.start_next_cycle()
    assert s.receive_eof() == []
    assert s.their_state == CLOSED


def test_large_body_is_streamed_not_joined(backend: str) -> None:
    size, step = 4 * 1024 * 1024, 64 * 1024
    s = server(backend)
    events = s.receive_data(b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
    total = 0
    block = b"z" * step
    for _ in range(size // step):
        chunk_events = s.receive_data(block)
        bodies = [e for e in chunk_events if type(e) is Body]
        assert bodies and all(len(b.data) <= step for b in bodies)
        total += sum(len(b.data) for b in bodies)
        events += chunk_events
    assert total == size and events[-1] == End()


# --- Expect, HEAD/204/304, Upgrade, CONNECT ---------------------------------


def test_expect_100_continue_is_visible_and_interim_reply_sent(backend: str) -> None:
    s = server(backend)
    [head] = s.receive_data(
        b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert head.expect_continue and (b"expect", b"100-continue") in head.headers
    assert bytes(s.send(ResponseHead(100, b"Continue", []))).startswith(b"HTTP/1.1 100 ")
    assert s.receive_data(b"hi") == [Body(b"hi"), End()]
    respond(s)
    assert s.our_state == DONE


def test_client_passes_interim_response_then_final(backend: str) -> None:
    c = client(backend)
    events = c.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert [e.status for e in heads(events)] == [100, 200]
    assert events[-1] == End() and c.their_state == DONE


@pytest.mark.parametrize(
    ("method", "status_line"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK"),
        (b"GET", b"HTTP/1.1 204 No Content"),
        (b"GET", b"HTTP/1.1 304 Not Modified"),
    ],
)
def test_bodyless_responses_ignore_content_length(
    backend: str, method: bytes, status_line: bytes
) -> None:
    c = client(backend, method)
    events = c.receive_data(status_line + b"\r\nContent-Length: 5\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, End]
    assert (c.their_state, c.our_state) == (DONE, DONE)
    c.start_next_cycle()
    c.send(RequestHead(b"GET", b"/n", [(b"host", b"up")]))
    c.send(END)
    events = c.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert normalise(events)[1:] == [Body(b"ok"), End()]


def test_server_sends_no_body_for_head(backend: str) -> None:
    s = server(backend)
    s.receive_data(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    out = bytes(s.send(ResponseHead(200, b"OK", [(b"content-length", b"5")])))
    out += bytes(s.send(END))
    assert out.endswith(b"\r\n\r\n") and s.our_state == DONE


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_accepted_hands_back_raw_bytes(backend: str) -> None:
    s = server(backend)
    events = s.receive_data(UPGRADE + b"\x81\x02hi")
    assert events[0].upgrade and events[1] == End() and events[-1] is PAUSED
    assert s.their_state == MIGHT_SWITCH_PROTOCOL
    s.receive_data(b"more")
    out = bytes(s.send(ResponseHead(101, b"Switching Protocols", [(b"upgrade", b"websocket")])))
    assert out.startswith(b"HTTP/1.1 101 ")
    assert (s.their_state, s.our_state) == (SWITCHED_PROTOCOL, SWITCHED_PROTOCOL)
    assert s.trailing_data == b"\x81\x02himore"


def test_upgrade_declined_keeps_speaking_http(backend: str) -> None:
    s = server(backend)
    s.receive_data(UPGRADE + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    respond(s)
    assert (s.their_state, s.our_state) == (DONE, DONE)
    s.start_next_cycle()
    assert heads(s.receive_data(b""))[0].target == b"/next"


def test_connect_tunnel_on_server_side(backend: str) -> None:
    s = server(backend)
    events = s.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x01")
    assert events[0].method == b"CONNECT" and events[0].upgrade and events[1] == End()
    s.send(ResponseHead(200, b"Connection Established", []))
    assert s.their_state == SWITCHED_PROTOCOL
    assert s.trailing_data == b"\x00\x01"


def test_client_switches_after_101(backend: str) -> None:
    c = make(backend, "client")
    c.send(
        RequestHead(
            b"GET", b"/ws", [(b"host", b"a"), (b"connection", b"upgrade"), (b"upgrade", b"ws")]
        )
    )
    c.send(END)
    events = c.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nRAW"
    )
    assert heads(events)[0].status == 101
    assert c.their_state == SWITCHED_PROTOCOL
    assert c.trailing_data == b"RAW"


def test_client_connect_2xx_becomes_tunnel(backend: str) -> None:
    c = make(backend, "client")
    c.send(RequestHead(b"CONNECT", b"db:5432", [(b"host", b"db:5432")]))
    c.send(END)
    events = c.receive_data(b"HTTP/1.1 200 OK\r\n\r\n\x00tunnel")
    assert [type(e) for e in events if e is not PAUSED] == [ResponseHead]
    assert c.their_state == SWITCHED_PROTOCOL
    assert c.trailing_data == b"\x00tunnel"


def test_client_connect_refused_reads_the_body(backend: str) -> None:
    c = make(backend, "client")
    c.send(RequestHead(b"CONNECT", b"db:5432", [(b"host", b"db:5432")]))
    c.send(END)
    events = c.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert normalise(events)[1:] == [Body(b"no"), End()]


# --- hop-by-hop ---------------------------------------------------------------


def test_strip_hop_by_hop_removes_fixed_and_connection_named_fields() -> None:
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, X-Trace"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"trailer", b"x"),
        (b"x-trace", b"1"),
        (b"x-keep", b"2"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"a"), (b"x-keep", b"2")]


# --- rejections (RFC 9112 §6.3, §5.2, RFC 6585) ------------------------------

BAD = {
    "cl+te": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "te+cl": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400,
    ),
    "cl-differ": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    # Documented strictness: identical duplicates are refused too (llhttp's rule).
    "cl-same": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "cl-sign": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    "chunk-size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
        400,
    ),
    "te-gzip": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n  c\r\n\r\n", 400),
    "name-space": (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", 400),
    "name-colon-space": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "ctl-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_requests_are_rejected_with_status(backend: str, case: str) -> None:
    data, status = BAD[case]
    s = server(backend)
    err = error_of(s.receive_data(data))
    assert err.status == status, err
    assert s.their_state == ERROR and not s.keep_alive
    assert s.receive_data(GET) == []  # latched


def test_rejection_holds_for_byte_at_a_time_feeding(backend: str) -> None:
    for case, (data, status) in BAD.items():
        s = server(backend)
        assert error_of(feed(s, data, [1] * len(data))).status == status, case


def test_local_reply_after_error_says_close(backend: str) -> None:
    s = server(backend)
    s.receive_data(BAD["cl+te"][0])
    out = bytes(s.send(ResponseHead(400, b"Bad Request", [(b"content-length", b"0")])))
    out += bytes(s.send(END))
    assert out.startswith(b"HTTP/1.1 400 ") and b"connection: close" in out.lower()
    assert s.our_state == MUST_CLOSE


def test_too_many_headers_is_431(backend: str) -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(20))
    events = server(backend, max_header_count=20).receive_data(
        b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n"
    )
    assert error_of(events).status == 431


def test_header_count_at_the_limit_passes(backend: str) -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(99))
    events = server(backend).receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert len(events[0].headers) == 100


def test_header_bytes_over_limit_is_431(backend: str) -> None:
    big = b"X-Big: " + b"v" * (70 * 1024) + b"\r\n"
    events = server(backend).receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert error_of(events).status == 431


def test_header_bytes_under_limit_pass(backend: str) -> None:
    big = b"X-Big: " + b"v" * (50 * 1024) + b"\r\n"
    events = server(backend).receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert len(events[0].headers[1][1]) == 50 * 1024


def test_endless_head_is_cut_off_while_streaming(backend: str) -> None:
    # A head that never ends must be refused once it passes the limit,
    # without waiting for a CRLFCRLF that never comes.
    s = server(backend, max_header_bytes=4096)
    events = s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    for _ in range(20):
        events += s.receive_data(b"v" * 1024)
    assert error_of(events).status == 431


def test_bad_responses_are_protocol_errors(backend: str) -> None:
    c = client(backend)
    events = c.receive_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert error_of(events).status == 400


# --- sending ------------------------------------------------------------------


def test_serialiser_refuses_crlf_injection(backend: str) -> None:
    s = server(backend)
    s.receive_data(GET)
    with pytest.raises(CodecUsageError):
        s.send(ResponseHead(200, b"OK", [(b"x", b"a\r\nSet-Cookie: evil")]))


def test_serialiser_enforces_content_length(backend: str) -> None:
    c = make(backend, "client")
    c.send(RequestHead(b"POST", b"/", [(b"host", b"a"), (b"content-length", b"2")]))
    with pytest.raises(CodecUsageError):
        c.send(Body(b"abc"))
    c.send(Body(b"a"))
    with pytest.raises(CodecUsageError):
        c.send(END)


def test_chunked_send_with_trailers(backend: str) -> None:
    c = make(backend, "client")
    out = bytes(
        c.send(RequestHead(b"POST", b"/", [(b"host", b"a"), (b"transfer-encoding", b"chunked")]))
    )
    out += bytes(c.send(Body(b"abc"))) + bytes(c.send(Body(b"")))
    out += bytes(c.send(Trailers([(b"x-sum", b"1")]))) + bytes(c.send(END))
    assert out.endswith(b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n")


def test_response_without_length_to_http10_is_close_delimited(backend: str) -> None:
    s = server(backend)
    s.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    out = respond(s, b"abc", [])
    assert out.endswith(b"\r\n\r\nabc") and b"chunked" not in out.lower()
    assert s.our_state == MUST_CLOSE


# --- round trips and incremental equivalence ---------------------------------

REQUESTS = [
    RequestHead(b"GET", b"/x?y=1", [(b"host", b"a"), (b"accept", b"*/*")]),
    RequestHead(b"POST", b"/p", [(b"host", b"a"), (b"content-length", b"11")]),
    RequestHead(b"PUT", b"/c", [(b"host", b"a"), (b"transfer-encoding", b"chunked")]),
]
BODIES = [[], [b"hello", b" world"], [b"a" * 1000, b"b", b"c" * 70000]]


@pytest.mark.parametrize("parser_backend", BACKENDS)
def test_round_trip_requests(backend: str, parser_backend: str) -> None:
    sender = make(backend, "client")
    parser = make(parser_backend, "server")
    for head, bodies in zip(REQUESTS, BODIES, strict=True):
        wire = bytes(sender.send(head))
        for b in bodies:
            wire += bytes(sender.send(Body(b)))
        wire += bytes(sender.send(END))
        events = normalise(parser.receive_data(wire))
        assert (events[0].method, events[0].target, events[0].headers) == (
            head.method,
            head.target,
            head.headers,
        )
        expected = [Body(b"".join(bodies))] if bodies else []
        assert events[1:] == expected + [End()]
        parser.send(ResponseHead(204, b"No Content", []))
        parser.send(END)
        parser.start_next_cycle()
        sender.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
        sender.start_next_cycle()


@pytest.mark.parametrize("parser_backend", BACKENDS)
def test_round_trip_responses(backend: str, parser_backend: str) -> None:
    for body_parts, headers in [
        ([b"abc"], [(b"content-length", b"3"), (b"x-a", b"1")]),
        ([b"abc", b"defg"], [(b"x-a", b"1")]),  # no length: chunked to a 1.1 peer
        ([], [(b"content-length", b"0")]),
    ]:
        srv = make(backend, "server")
        srv.receive_data(GET)
        wire = bytes(srv.send(ResponseHead(200, b"OK", headers)))
        for b in body_parts:
            wire += bytes(srv.send(Body(b)))
        wire += bytes(srv.send(END))
        cli = client(parser_backend)
        events = normalise(cli.receive_data(wire))
        assert events[0].status == 200
        assert ((b"x-a", b"1") in events[0].headers) == ((b"x-a", b"1") in headers)
        expected = [Body(b"".join(body_parts))] if body_parts else []
        assert events[1:] == expected + [End()]
        assert cli.their_state == DONE


CORPUS = [
    GET,
    CHUNKED_REQ,
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nT: v\r\n\r\n",
    UPGRADE + b"rawbytes",
    b"GET / HTTP/1.0\r\n\r\n",
] + [data for data, _ in BAD.values()]


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_incremental_feeding_gives_identical_events(backend: str, index: int) -> None:
    data = CORPUS[index]
    whole = normalise(server(backend).receive_data(data))
    byte_by_byte = normalise(feed(server(backend), data, [1] * len(data)))
    assert byte_by_byte == whole
    rng = random.Random(index)
    for _ in range(5):
        split = normalise(feed(server(backend), data, random_pieces(rng, len(data))))
        assert split == whole


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_backends_agree(index: int) -> None:
    data = CORPUS[index]

    def shape(events: list) -> list:
        # Error texts differ between parsers; statuses must not.
        return [e.status if type(e) is ProtocolError else e for e in normalise(events)]

    assert shape(server("fast").receive_data(data)) == shape(server("h11").receive_data(data))


# Heads the native scanner takes (and some it must hand to llhttp): same events either way.
SCANNED_REQUESTS = [
    GET,
    b"GET /a/b?c=d&e=%20f HTTP/1.1\r\nHost: svc:8080\r\nUser-Agent: x/1\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nhost: a\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nHost:a\r\nConnection: close\r\nX-Empty:\r\nX-Sp:  a  b \t\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nKeep-Alive: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n",  # not in the scanned set: llhttp
    b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",  # non-ASCII target: llhttp decides
    b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text value: llhttp
]
SCANNED_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 21 Nov 2026 23:30:00 GMT\r\n"
    b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\nabc",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
    b"HTTP/1.1 304\r\nETag: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",  # no length: llhttp reads until EOF
]


def _all_events(codec: Http1Codec, data: bytes) -> list:
    events = codec.receive_data(data)
    while codec.their_state == DONE and codec.role == "server":
        codec.send(ResponseHead(204, b"", []))
        codec.send(END)
        codec.start_next_cycle()
        more = codec.receive_data(b"")
        if not more:
            break
        events += more
    return normalise(events + codec.receive_eof())


@pytest.mark.parametrize("index", range(len(SCANNED_REQUESTS)))
def test_native_scanner_agrees_with_llhttp_on_requests(index: int) -> None:
    data = SCANNED_REQUESTS[index]
    assert _all_events(server("fast"), data) == _all_events(server("fast-llhttp"), data)


@pytest.mark.parametrize("index", range(len(SCANNED_RESPONSES)))
def test_native_scanner_agrees_with_llhttp_on_responses(index: int) -> None:
    data = SCANNED_RESPONSES[index]
    assert _all_events(client("fast"), data) == _all_events(client("fast-llhttp"), data)


@pytest.mark.parametrize("backend_name", ["fast", "fast-llhttp"])
def test_whole_heads_carry_their_wire_bytes_less_hop_by_hop(backend_name: str) -> None:
    head = server(backend_name).receive_data(SCANNED_REQUESTS[5])[0]
    # Connection names X-Hop: the scanner declines such a request (what Connection names is
    # checked on llhttp's path), which cuts that line too: X-Hop and TE never reach the next hop.
    assert head.wire == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    head = server(backend_name).receive_data(SCANNED_REQUESTS[3])[0]
    assert head.wire == b"GET / HTTP/1.1\r\nHost:a\r\nX-Empty:\r\nX-Sp:  a  b \t\r\n\r\n"
    response = client(backend_name).receive_data(SCANNED_RESPONSES[0])[0]
    assert b"Connection" not in response.wire and response.wire.endswith(
        b"GMT\r\nContent-Length: 3\r\n\r\n"
    )
    # HTTP/1.0 heads are always serialised anew (the proxy speaks 1.1).
    assert server(backend_name).receive_data(SCANNED_REQUESTS[4])[0].wire is None


@pytest.mark.parametrize(
    "line", [b"GET  /x HTTP/1.1", b"GET /x  HTTP/1.1", b"GET /x HTTP/1.1 ", b"GET\t/x HTTP/1.1"]
)
def test_a_request_line_with_extra_whitespace_is_sent_on_with_single_spaces(line: bytes) -> None:
    down, up = server("fast"), make("fast", "client")
    events = down.receive_data(line + b"\r\nHost: a\r\n\r\n")
    if not isinstance(events[0], RequestHead):
        return  # refused: nothing goes on
    assert events[0].wire is None
    assert bytes(up.send(events[0])).startswith(b"GET /x HTTP/1.1\r\n")


def test_a_head_sent_as_its_wire_bytes_round_trips() -> None:
    down, up = server("fast"), make("fast", "client")
    request = down.receive_data(SCANNED_REQUESTS[1])[0]
    assert bytes(up.send(request)) == SCANNED_REQUESTS[1] and up.send(END) == b""
    response = up.receive_data(SCANNED_RESPONSES[0])[0]
    out = bytes(down.send_message(response, b"abc"))
    assert out == response.wire + b"abc"
    assert down.our_state == DONE and up.their_state == DONE


def test_response_incremental_feeding(backend: str) -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\nX: 1\r\n\r\n"
    )
    whole = normalise(client(backend).receive_data(data))
    assert normalise(feed(client(backend), data, [1] * len(data))) == whole
    assert (
        normalise(
            feed(
                client(backend, b"HEAD"), b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", [1] * 40
            )
        )[-1]
        == End()
    )


# --- fuzz -----------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[min(pos, len(b) - 1)]
        elif op == 1:
            b[pos:pos] = bytes([rng.randrange(256)])
        elif op == 2:
            b[pos:pos] = rng.choice([b"\r\n", b"\n", b" ", b":", b"0", b"\r\n\r\n", b"chunked"])
        elif b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
    return bytes(b)


ALLOWED = (RequestHead, ResponseHead, Body, Trailers, End, Reset, ProtocolError)


def _drive(codec: Http1Codec, data: bytes, rng: random.Random) -> None:
    events = feed(codec, data, random_pieces(rng, len(data)))
    # Let the codec answer what it parsed, so later cycles and switches run too.
    for _ in range(4):
        if codec.role == "server" and codec.their_state not in (IDLE, ERROR, CLOSED):
            if codec.our_state == IDLE:
                codec.send(ResponseHead(404, b"", [(b"content-length", b"0")]))
                codec.send(END)
        if codec.their_state == DONE and codec.our_state == DONE:
            codec.start_next_cycle()
            events += codec.receive_data(b"")
        else:
            break
    events += codec.receive_eof()
    for ev in events:
        assert ev is PAUSED or isinstance(ev, ALLOWED), ev


@pytest.mark.parametrize("role", ["server", "client"])
def test_fuzz_never_raises(backend: str, role: str) -> None:
    rng = random.Random(0xC0DEC)
    seeds = (
        CORPUS
        if role == "server"
        else [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nbody",
        ]
    )
    for i in range(1500):
        if i % 5 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            data = _mutate(rng, rng.choice(seeds))
        if role == "server":
            codec = server(backend)
        else:
            codec = client(backend, rng.choice([b"GET", b"HEAD", b"CONNECT"]))
        _drive(codec, data, rng)


def test_fuzz_detects_a_raising_codec() -> None:
    # The fuzz harness must be able to fail: a codec that raises is caught.
    class Broken(type(server("fast"))):  # type: ignore[misc]
        def _feed(self, data: object) -> None:
            raise ValueError("boom")

    with pytest.raises(ValueError):
        _drive(Broken("server"), b"GET", random.Random(1))


def test_a_head_with_wire_bytes_is_serialised_anew_without_hop_by_hop_when_it_must_be() -> None:
    # An HTTP/1.0 client cannot take the upstream's 1.1 head as is: the codec writes its own,
    # and the upstream's Connection line (as received in the list) must not come along.
    down, up = server("fast"), make("fast", "client")
    down.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    up.send(RequestHead(b"GET", b"/", [(b"host", b"a")]))
    up.send(END)
    response = up.receive_data(SCANNED_RESPONSES[0])[0]
    assert response.wire is not None and (b"connection", b"keep-alive") in response.headers
    out = bytes(down.send_message(response, b"abc"))
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nabc")
    assert out.lower().count(b"connection:") == 1  # the codec's own keep-alive announcement
