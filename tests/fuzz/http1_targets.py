"""HTTP/1 targets: the two backends (and the native head scanner) must agree on every input,
however it is split, and what one backend serialises the other parses back unchanged.

A disagreement between parsers in front of and behind a proxy is how requests are
smuggled, so "fast accepts, h11 rejects" is a finding even when neither crashes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

from pyproxy.native import http1_head_scanner

from fuzz.draw import Draw, splits
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
    DONE,
    ERROR,
    IDLE,
    MIGHT_SWITCH_PROTOCOL,
    SWITCHED_PROTOCOL,
    CodecUsageError,
    Http1Codec,
    Http1Limits,
    strip_hop_by_hop_lines,
)
from pyproxy.codec.http1_backend import make_http1_codec
from pyproxy.codec.http1_fast import FastHttp1Codec

BACKENDS = ("fast", "fast-llhttp", "h11")
_SCAN = http1_head_scanner()
_NOT_FOUND = ResponseHead(404, b"Not Found", [(b"content-length", b"0")])
MAX_CYCLES = 4


def codec(backend: str, role: str, limits: Http1Limits | None = None) -> Http1Codec:
    """``fast-llhttp`` is the fast backend with the native head scanner off."""
    limits = limits or Http1Limits()
    if backend == "fast-llhttp":
        return FastHttp1Codec(role, limits, native_scan=False)  # type: ignore[arg-type]
    return make_http1_codec(backend, role, limits)  # type: ignore[arg-type]


# --- observing a codec -------------------------------------------------------------


def summary(events: list) -> list[tuple]:
    """Events as comparable tuples: bodies joined, PAUSED dropped, nothing after a rejection.

    Heads end with their wire bytes, rejections carry their status: the native scanner
    and llhttp must match exactly; ``plain`` leaves out what other comparisons may not.
    """
    out: list[tuple] = []
    for ev in events:
        kind = type(ev)
        if ev is PAUSED:
            continue
        if kind is Body:
            data = bytes(ev.data)
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + data)
            elif data:
                out.append(("body", data))
        elif kind is RequestHead:
            out.append(
                (
                    "request",
                    ev.method,
                    ev.target,
                    tuple(ev.headers),
                    ev.http_version,
                    ev.keep_alive,
                    ev.content_length,
                    ev.chunked,
                    ev.expect_continue,
                    ev.upgrade,
                    ev.wire,
                )
            )
        elif kind is ResponseHead:
            out.append(
                (
                    "response",
                    ev.status,
                    ev.reason,
                    tuple(ev.headers),
                    ev.http_version,
                    ev.keep_alive,
                    ev.content_length,
                    ev.chunked,
                    ev.wire,
                )
            )
        elif kind is Trailers:
            out.append(("trailers", tuple(ev.headers)))
        elif kind is End:
            out.append(("end",))
        elif kind is Reset:
            out.append(("reset",))
            break
        elif kind is ProtocolError:
            out.append(("rejected", ev.status))
            break
    return out


def serve(server: Http1Codec, pieces: list[bytes]) -> list:
    """Feed request bytes to a server-role codec, answering 404 to each request so pipelined
    ones follow (up to MAX_CYCLES), then EOF; returns every event."""
    events: list = []
    cycles = 0
    for piece in pieces:
        events += server.receive_data(piece)
        while cycles < MAX_CYCLES and _answer(server):
            cycles += 1
            events += server.receive_data(b"")
        if server.their_state in (ERROR, SWITCHED_PROTOCOL):
            return events
    return events + server.receive_eof()


def _answer(server: Http1Codec) -> bool:
    """Answer a finished request; True when the next cycle began."""
    their = server.their_state
    if server.our_state is not IDLE or (their is not DONE and their is not MIGHT_SWITCH_PROTOCOL):
        return False
    server.send(_NOT_FOUND)
    server.send(END)
    if not server.cycle_done:
        return False
    server.start_next_cycle()
    return True


def fetch(client: Http1Codec, request: RequestHead, pieces: list[bytes]) -> list:
    """Send ``request`` (again after each response, up to MAX_CYCLES) and feed response bytes."""
    events: list = []
    client.send(request)
    client.send(END)
    cycles = 1
    for piece in pieces:
        events += client.receive_data(piece)
        while cycles < MAX_CYCLES and client.cycle_done:
            cycles += 1
            client.start_next_cycle()
            client.send(request)
            client.send(END)
            events += client.receive_data(b"")
        if client.their_state in (ERROR, SWITCHED_PROTOCOL):
            return events
    return events + client.receive_eof()


# --- what the backends may legitimately differ on ----------------------------------


@cache
def llhttp_knows(method: bytes) -> bool:
    """llhttp has a fixed method table and rejects the rest (documented in http1_fast)."""
    probe = codec("fast-llhttp", "server")
    events = probe.receive_data(method + b" / HTTP/1.1\r\nhost: a\r\n\r\n")
    return bool(events) and type(events[0]) is RequestHead


def comparable(summary_: list[tuple]) -> list[tuple]:
    """A request with a method llhttp lacks ends the comparison like a rejection (``plain``
    drops those): h11 accepts any token and leaves the 501 to the proxy."""
    for i, item in enumerate(summary_):
        if item[0] == "request" and not llhttp_knows(item[1]):
            return summary_[:i]
    return summary_


# --- targets -------------------------------------------------------------------------


def limits_for(seed: int) -> Http1Limits:
    """Split seeds from 0xF0 up also shrink the limits, so their edges are compared too."""
    if seed < 0xF0:
        return Http1Limits()
    return Http1Limits(max_header_bytes=40 + (seed & 0xF) * 12, max_header_count=seed & 0x7)


def split_agrees(whole: list[tuple], cut: list[tuple]) -> bool:
    """The same events and statuses whole and split."""
    for early, late in ((whole, cut), (cut, whole)):
        done = len(early) - 1
        if (
            early[-2:] == [("end",), ("rejected", 400)]
            and late[done : done + 1][:1]
            and (late[done][0] in ("response", "rejected"))
        ):
            # The same: response bytes that came with the last one (refused: we never pipeline)
            # are, read after the next request was sent, its response (or refused as one).
            return plain(early[:done]) == plain(late[:done])
    if whole[-1:] == [("reset",)] or cut[-1:] == [("reset",)]:
        # Response bytes that came with the last one are refused as early; the same bytes
        # read after the next request was sent are its (unfinished) response.
        return plain(whole) == plain(cut)
    return plain(whole, status=True) == plain(cut, status=True)


def http1_request(data: bytes) -> None:
    """Server role: every backend, whole and split, gives the same events for the same bytes."""
    if not data:
        return
    results = _on_every_backend("server", serve, data[1:], data[0])
    fast, h11 = (comparable(plain(results[b])) for b in ("fast", "h11"))
    if _LONG_CHUNK_SIZE.search(data):
        return  # open finding, see _LONG_CHUNK_SIZE
    if _REPEATED_SP.search(data):
        return  # open finding, see _REPEATED_SP
    assert fast == h11, (fast, h11)


# Open finding: llhttp takes more than one SP between the parts of a request line (RFC
# 9112 §3 allows parsing on whitespace boundaries) where h11 refuses it. The fast backend
# re-serialises such a line (one SP each) rather than passing its wire bytes on; the native
# scanner declines it.
_REPEATED_SP = re.compile(rb"(?:^|\n)[^ \r\n]+[^\r\n]*?  [^\r\n]*HTTP/")


# Open finding: llhttp takes a chunk size of any number of hex digits (leading zeros),
# h11 at most 20; llhttp's parser does not show the fast backend the size line.
_LONG_CHUNK_SIZE = re.compile(rb"\n[0-9A-Fa-f]{21,}[;\r\n]")


def http1_response(data: bytes) -> None:
    """Client role, after a GET / HEAD / POST / Upgrade request: the same agreement as above."""
    if len(data) < 2:
        return
    kind = data[1] % 4
    headers = [(b"host", b"up")]
    if kind == 3:
        headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    request = RequestHead((b"GET", b"HEAD", b"POST", b"GET")[kind], b"/", headers)
    results = _on_every_backend(
        "client", lambda client, pieces: fetch(client, request, pieces), data[2:], data[0]
    )
    if not _LONG_CHUNK_SIZE.search(data) and not _EMPTY_LINE_AFTER_INTERIM.search(data):
        assert plain(results["fast"]) == plain(results["h11"]), results


# Open finding: llhttp skips empty lines between an interim (1xx) response and the next
# one; h11, mid-cycle, refuses them, and the wrapper can only skip them between cycles.
_EMPTY_LINE_AFTER_INTERIM = re.compile(rb"HTTP/[^\r\n]* 1\d\d[^\n]*\n(?:[^\r\n]+\r?\n)*\r?\n[\r\n]")


def _on_every_backend(
    role: str, drive: Callable[[Http1Codec, list[bytes]], list], payload: bytes, seed: int
) -> dict[str, list[tuple]]:
    """Each backend's summary of ``payload`` fed whole, checked against the same fed in the
    pieces ``seed`` picks; the native scanner's run checked against llhttp's."""
    limits = limits_for(seed)
    results = {}
    for backend in BACKENDS:
        whole = summary(drive(codec(backend, role, limits), [payload]))
        cut = summary(drive(codec(backend, role, limits), splits(payload, seed)))
        assert split_agrees(whole, cut), (backend, whole, cut)
        results[backend] = whole
    assert_scanner_agrees(results["fast"], results["fast-llhttp"])
    return results


def assert_scanner_agrees(native: list[tuple], llhttp: list[tuple]) -> None:
    """The same events and statuses; wire bytes equal where both paths kept them (the
    scanner gives none when a Connection option names a field, llhttp strips the line)."""
    assert plain(native, status=True) == plain(llhttp, status=True), (native, llhttp)
    for a, b in zip(native, llhttp, strict=True):
        if a[0] in ("request", "response") and a[-1] is not None and b[-1] is not None:
            assert a[-1] == b[-1], (a, b)


def plain(summary_: list[tuple], status: bool = False) -> list[tuple]:
    """Without wire bytes (present only when a head arrived whole) and, unless ``status``,
    without the failure that ends the input: a parser may reject garbage at once or wait
    for bytes that never come and report a reset at EOF; either way nothing more was
    accepted, and what was accepted before it is what must agree."""
    out = []
    for item in summary_:
        if item[0] in ("request", "response"):
            # h11 lower-cases a Transfer-Encoding value (its meaning is case-blind).
            item = (*item[:3], _te_folded(item[3]), *item[4:-1], None)
        elif item[0] in ("rejected", "reset") and not status:
            break
        out.append(item)
    return out


def _te_folded(headers: tuple) -> tuple:
    return tuple((n, v.lower() if n == b"transfer-encoding" else v) for n, v in headers)


def native_scanner(data: bytes) -> None:
    """Whatever head the native scanner accepts, llhttp accepts with the same meaning."""
    if _SCAN is None or len(data) < 3:
        return
    is_request = data[0] & 1 == 1
    max_bytes, max_count, payload = 16 + data[1] * 4, data[2] % 40, data[3:]
    found = _SCAN(payload, is_request, max_bytes, max_count)
    if found is None:
        return
    size, first, second, version, headers, length, close, keep_alive, expect, wire = found
    head_bytes = payload[:size]
    assert head_bytes.endswith(b"\r\n\r\n") and head_bytes.count(b"\r\n\r\n") == 1, found
    limits = Http1Limits(max_header_bytes=max_bytes, max_header_count=max_count)
    reference = codec("fast-llhttp", "server" if is_request else "client", limits)
    if is_request:
        events = reference.receive_data(head_bytes)
    else:
        reference.send(RequestHead(b"GET", b"/", [(b"host", b"up")]))
        reference.send(END)
        events = reference.receive_data(head_bytes)
    assert events and type(events[0]) in (RequestHead, ResponseHead), (found, events)
    head = events[0]
    if is_request:
        assert (head.method, head.target) == (first, second), (found, head)
        assert head.expect_continue == expect, (found, head)
    else:
        assert (head.status, head.reason) == (first, second), (found, head)
    persistent = not close and (version == b"1.1" or keep_alive)
    if not is_request and length is None and first not in (204, 304):
        persistent = False  # runs until close; FastHttp1Codec leaves these heads to llhttp
    assert (head.headers, head.http_version, head.content_length, head.keep_alive) == (
        headers,
        version,
        length,
        persistent,
    ), (found, head)
    if wire is not None:
        assert wire == strip_hop_by_hop_lines(head_bytes, headers), (found, head)


# --- round trips ---------------------------------------------------------------------

_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALUE = bytes(range(0x21, 0x7F)) + b" \t"
_PATH = b"abcXYZ0189-._~!$&'()*+,;=:@/?%"
_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"PROPFIND")
_FRAMING = {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade"}
_FRAMING |= {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"expect"}


def _fields(draw: Draw, count: int) -> list[tuple[bytes, bytes]]:
    fields = []
    for _ in range(count):
        name = draw.text(_TOKEN, 12) or b"x"
        value = draw.text(_VALUE, 20).strip(b" \t")
        if name.lower() not in _FRAMING:
            fields.append((name, value))
    return fields


def http1_roundtrip(data: bytes) -> None:
    """parse(serialise(message)) == message, for requests and responses, across backends."""
    draw = Draw(data)
    sender, receiver = draw.pick(BACKENDS), draw.pick(BACKENDS)
    is_request = draw.flag()
    fields = _fields(draw, draw.below(6))
    body_kind = draw.below(3)  # none, Content-Length, chunked
    chunks = [draw.blob(40) for _ in range(draw.below(4))] if body_kind else []
    trailers = _fields(draw, draw.below(3)) if body_kind == 2 else []
    body = b"".join(chunks)
    framing = []
    if body_kind == 1:
        framing = [(b"content-length", b"%d" % len(body))]
    elif body_kind == 2:
        framing = [(b"transfer-encoding", b"chunked")]
    if is_request:
        target = b"/" + draw.text(_PATH, 30)
        head: RequestHead | ResponseHead = RequestHead(
            draw.pick(_METHODS), target, [(b"host", b"example.org"), *fields, *framing]
        )
        out, into = codec(sender, "client"), codec(receiver, "server")
    else:
        status = 200 + draw.below(400)
        if status in (204, 304):
            status = 200
        head = ResponseHead(status, draw.text(_TOKEN + b" ", 12).strip(b" "), [*fields, *framing])
        out, into = codec(sender, "server"), codec(receiver, "client")
        get = RequestHead(b"GET", b"/", [(b"host", b"example.org")])
        out.receive_data(codec("fast", "client").send_message(get, b""))
        into.send_message(get, b"")
    try:
        wire = [out.send(head)]
        wire += [out.send(Body(chunk)) for chunk in chunks]
        if trailers:
            wire.append(out.send(Trailers(trailers)))
        wire.append(out.send(END))
    except CodecUsageError as exc:  # only for what the generator cannot produce
        raise AssertionError(f"{sender} refused a valid message: {exc}") from exc
    got = summary(into.receive_data(b"".join(bytes(w) for w in wire)))
    lowered = [(n.lower(), v) for n, v in [*head.headers]]
    assert got and got[0][0] in ("request", "response"), (sender, receiver, got)
    received = got[0]
    if is_request:
        assert received[1:3] == (head.method, head.target), (received, head)  # type: ignore[union-attr]
    else:
        assert received[1] == head.status, (received, head)  # type: ignore[union-attr]
    sent_fields = [f for f in lowered if f[0] not in (b"transfer-encoding", b"content-length")]
    got_fields = [f for f in received[3] if f[0] not in (b"transfer-encoding", b"content-length")]
    assert got_fields == sent_fields, (sender, receiver, got_fields, sent_fields)
    rest = got[1:]
    expected: list[tuple] = [("body", body)] if body else []
    if trailers:
        expected.append(("trailers", tuple((n.lower(), v) for n, v in trailers)))
    expected.append(("end",))
    assert rest == expected, (sender, receiver, rest, expected)
