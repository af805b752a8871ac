"""Both HTTP/1 backends give the same answer to the same bytes, however the reads split them:
chunk lines llhttp refuses are refused by the h11 backend too, and an unsupported
Transfer-Encoding is 501 only when nothing in the head is malformed (400 wins)."""

from __future__ import annotations

import pytest
from fuzz.http1_targets import BACKENDS, codec, serve, summary

from pyproxy.codec.events import RequestHead
from pyproxy.codec.http1 import Http1Limits

_GET = RequestHead(b"GET", b"/", [(b"host", b"up")])
HEAD = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"

# Chunked bodies h11 alone used to take (and re-frame); llhttp answers 400. Each with the
# content passed on before the fault.
REFUSED_CHUNKED = {
    "space before the size line's CRLF": (b"5 \r\nhello\r\n0\r\n\r\n", b""),
    "tab before the size line's CRLF": (b"5\t\r\nhello\r\n0\r\n\r\n", b""),
    "space after the extension's ;": (b"5; a\r\nhello\r\n0\r\n\r\n", b""),
    "spaces around the extension's =": (b"5;a = b\r\nhello\r\n0\r\n\r\n", b""),
    "empty extension": (b"5;\r\nhello\r\n0\r\n\r\n", b""),
    "space inside an unquoted extension value": (b"5;a=b c\r\nhello\r\n0\r\n\r\n", b""),
    "control character in a quoted extension value": (b'5;a="\x01"\r\nhello\r\n0\r\n\r\n', b""),
    "non-ASCII extension name": (b"5;a\x80\r\nhello\r\n0\r\n\r\n", b""),
    "fault in the second size line": (b"5\r\nhello\r\n3;\r\nabc\r\n0\r\n\r\n", b"hello"),
    "bare LF ending a trailer line": (b"5\r\nhello\r\n0\r\nx: y\n\r\n", b"hello"),
    "obs-fold in the trailers": (b"5\r\nhello\r\n0\r\nx: y\r\n z\r\n\r\n", b"hello"),
    "bare LF ending the last line": (b"5\r\nhello\r\n0\r\n\n", b"hello"),
}


def every_split(data: bytes) -> list[list[bytes]]:
    """The bytes whole, in two reads at every boundary, and one byte per read."""
    pieces = [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]
    return pieces + [[data[i : i + 1] for i in range(len(data))]]


def answers(backend: str, data: bytes) -> set[tuple]:
    """Every distinct outcome (heads left out) of serving ``data`` in every split."""
    outcomes = set()
    for pieces in every_split(data):
        events = summary(serve(codec(backend, "server"), pieces))
        outcomes.add(tuple(e for e in events if e[0] != "request"))
    return outcomes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(REFUSED_CHUNKED))
def test_chunk_lines_llhttp_refuses_are_400_on_every_backend_and_split(backend, case):
    body, content = REFUSED_CHUNKED[case]
    expected = ((("body", content),) if content else ()) + (("rejected", 400),)
    assert answers(backend, HEAD + body) == {expected}


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_extensions_and_trailers_llhttp_takes_pass_on_every_backend_and_split(backend):
    body = b'5;a=b;c="x y";d=;e\r\nhello\r\n0\r\nx: y\r\n\r\n'
    assert answers(backend, HEAD + body) == {
        (("body", b"hello"), ("trailers", ((b"x", b"y"),)), ("end",))
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_transfer_encoding_before_a_malformed_line_is_400_on_every_split(backend):
    data = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\nbad line\r\n\r\n"
    assert answers(backend, data) == {(("rejected", 400),)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_transfer_encoding_in_a_sound_head_is_501_on_every_split(backend):
    data = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\nx: y\r\n\r\n"
    assert answers(backend, data) == {(("rejected", 501),)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_transfer_encoding_in_a_response_is_refused_on_every_split(backend):
    data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: br\r\n\r\n"
    for pieces in every_split(data):
        client = codec(backend, "client")
        client.send_message(_GET, b"")
        events = summary([e for p in pieces for e in client.receive_data(p)])
        assert events == [("rejected", 501)], (pieces, events)


# Heads at the header size limit: the raw head (start line through the empty line) is
# held to max_header_bytes whole or in pieces, and an oversized head is refused on its
# first max_header_bytes (a fault in them is 400, none is 431), however the reads split.
_LIMIT = 64
AT_THE_LIMIT = {
    "one byte under": (b"GET / HTTP/1.1\r\nhost:a\r\nx:%s\r\n\r\n" % (b"a" * 33), "request"),
    "exactly at": (b"GET / HTTP/1.1\r\nhost:a\r\nx:%s\r\n\r\n" % (b"a" * 34), "request"),
    "one byte over, measured under": (
        b"GET / HTTP/1.1\r\nhost:a\r\nx:%s\r\n\r\n" % (b"a" * 35),
        431,
    ),
    "over by its whitespace alone": (
        b"GET / HTTP/1.1\r\nhost: a\r\nx:%sa\r\n\r\n" % (b" " * 40),
        431,
    ),
    "over by its target": (b"GET /%s HTTP/1.1\r\nhost: a\r\n\r\n" % (b"a" * 60), 431),
    "a fault inside the limit": (
        b"GET / HTTP/1.1\r\nhost: a\r\nbad: \x01\r\nx: %s\r\n\r\n" % (b"a" * 40),
        400,
    ),
    "a fault past the limit": (
        b"GET / HTTP/1.1\r\nhost: a\r\nx: %s\r\nbad: \x01\r\n\r\n" % (b"a" * 50),
        431,
    ),
    "pipelined behind a body, over": (
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
        b"GET / HTTP/1.1\r\nhost:a\r\nx:%s\r\n\r\n" % (b"a" * 35),
        431,
    ),
    "pipelined behind a chunked body, at": (
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET / HTTP/1.1\r\nhost:a\r\nx:%s\r\n\r\n" % (b"a" * 34),
        "request",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(AT_THE_LIMIT))
def test_a_head_at_the_size_limit_gets_one_answer_on_every_split(backend, case):
    data, expected = AT_THE_LIMIT[case]
    limits = Http1Limits(max_header_bytes=_LIMIT)
    outcomes = set()
    for pieces in every_split(data):
        events = summary(serve(codec(backend, "server", limits), pieces))
        outcomes.add(events[-1][1] if events[-1][0] == "rejected" else events[-2][0])
    assert outcomes == {expected}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_response_head_at_the_size_limit_gets_one_answer_on_every_split(backend):
    limits = Http1Limits(max_header_bytes=_LIMIT)
    for pad, expected in ((22, "response"), (23, 431)):
        data = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx:%s\r\n\r\n" % (b"a" * pad)
        outcomes = set()
        for pieces in every_split(data):
            client = codec(backend, "client", limits)
            client.send_message(_GET, b"")
            events = summary([e for p in pieces for e in client.receive_data(p)])
            outcomes.add(events[-1][1] if events[-1][0] == "rejected" else events[0][0])
        assert outcomes == {expected}, (pad, outcomes)


# Trailer sections at the limit: held to max_header_bytes of raw bytes (first field line
# through the empty line) whole or in pieces, and to their measured size and field count
# at their end; an oversized one is refused on its first max_header_bytes (a fault in them
# is 400, none is 431), however the reads split it. HEAD is 56 bytes, within the limit.
_LAST = b"3\r\nabc\r\n0\r\n"
TRAILERS_AT_THE_LIMIT = {
    "one byte under": (b"t:%s\r\n\r\n" % (b"a" * 57), "end", 100),
    "exactly at": (b"t:%s\r\n\r\n" % (b"a" * 58), "end", 100),
    "one byte over, measured under": (b"t:%s\r\n\r\n" % (b"a" * 59), 431, 100),
    "over by its whitespace alone": (b"t:%sa\r\n\r\n" % (b" " * 60), 431, 100),
    "measured over, raw under": (b"a:b\r\n" * 12 + b"\r\n", 431, 100),
    "trailing whitespace is not measured": (b"a:b \r\n" * 10 + b"\r\n", "end", 100),
    "over the field count": (b"a:1\r\nb:2\r\nc:3\r\n\r\n", 431, 2),
    "a control character inside the limit": (b"b: \x01\r\nt: %s\r\n\r\n" % (b"a" * 60), 400, 100),
    "a bad field name inside the limit": (b"b d: x\r\nt: %s\r\n\r\n" % (b"a" * 60), 400, 100),
    "obs-fold inside the limit": (b"t: a\r\n b%s\r\n\r\n" % (b"a" * 60), 400, 100),
    "a fault past the limit": (b"t: %s\r\nb: \x01\r\n\r\n" % (b"a" * 60), 431, 100),
    "a framing field inside the limit": (
        b"content-length: 3\r\nt: %s\r\n\r\n" % (b"a" * 50),
        400,
        100,
    ),
    "a framing field cut by the limit": (
        b"t: %s\r\ncontent-length: 3\r\n\r\n" % (b"a" * 44),
        400,
        100,
    ),
    "a framing field past the limit": (
        b"t: %s\r\ntransfer-encoding: chunked\r\n\r\n" % (b"a" * 40),
        431,
        100,
    ),
    "at the limit, pipelined": (
        b"t:%s\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n" % (b"a" * 58),
        "end",
        100,
    ),
}


def outcome(events: list[tuple]) -> object:
    return events[-1][1] if events[-1][0] == "rejected" else events[-1][0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(TRAILERS_AT_THE_LIMIT))
def test_a_trailer_section_at_the_size_limit_gets_one_answer_on_every_split(backend, case):
    trailers, expected, count = TRAILERS_AT_THE_LIMIT[case]
    limits = Http1Limits(max_header_bytes=_LIMIT, max_header_count=count)
    outcomes = set()
    for pieces in every_split(HEAD + _LAST + trailers):
        outcomes.add(outcome(summary(serve(codec(backend, "server", limits), pieces))))
    assert outcomes == {expected}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_response_trailer_section_at_the_size_limit_gets_one_answer_on_every_split(backend):
    limits = Http1Limits(max_header_bytes=_LIMIT)
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for pad, expected in ((58, "end"), (59, 431)):
        data = head + _LAST + b"t:%s\r\n\r\n" % (b"a" * pad)
        outcomes = set()
        for pieces in every_split(data):
            client = codec(backend, "client", limits)
            client.send_message(_GET, b"")
            outcomes.add(outcome(summary([e for p in pieces for e in client.receive_data(p)])))
        assert outcomes == {expected}, (pad, outcomes)
