"""Both HTTP/1 backends give the same answer to the same bytes, however the reads split them:
chunk lines llhttp refuses are refused by the h11 backend too, and an unsupported
Transfer-Encoding is 501 only when nothing in the head is malformed (400 wins)."""

from __future__ import annotations

import pytest
from fuzz.http1_targets import BACKENDS, codec, serve, summary

from pyproxy.codec.events import RequestHead

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
