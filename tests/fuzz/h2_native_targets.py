"""Native HTTP/2 codec targets, differential against hyper-h2: the same bytes, cut anywhere, give
the same events and the same verdict on libnghttp2 behind NativeH2Connection as on h2 — as the
server (what a downstream sends) and as the client (what an upstream answers) — and answering
whatever was accepted never fails in C."""

from __future__ import annotations

from collections.abc import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from hpack import Encoder
from hyperframe.frame import SettingsFrame

from fuzz.draw import Draw, splits
from fuzz.http2_targets import _RESPONSE_VALUES, _STATUSES, _header, _stream_one
from pyproxy.codec import http2_native
from pyproxy.codec.http2 import PREFACE, _field_refused

SETTINGS_VALUES = {
    http2_native.MAX_CONCURRENT_STREAMS: 100,
    http2_native.INITIAL_WINDOW_SIZE: 65535,
    http2_native.MAX_HEADER_LIST_SIZE: 65536,
}
_GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]

Conn = H2Connection | http2_native.NativeH2Connection


def h2_server() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


def native_server() -> http2_native.NativeH2Connection:
    conn = http2_native.NativeH2Connection(False, 1000)
    conn.initiate(SETTINGS_VALUES, 65535)
    return conn


def h2_client(request: list) -> H2Connection:
    """A client that has sent ``request`` on stream 1 and expects its response."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(conn.get_next_available_stream_id(), request, end_stream=True)
    conn.data_to_send()
    return conn


def native_client(request: list) -> http2_native.NativeH2Connection:
    conn = http2_native.NativeH2Connection(True, 1000)
    conn.initiate(SETTINGS_VALUES, 65535)
    conn.send_headers(conn.get_next_available_stream_id(), request, end_stream=True)
    conn.data_to_send()
    return conn


def outcome(conn: Conn, chunks: list[bytes]) -> tuple[list, bool]:
    """(the events the proxy acts on, normalised; whether the connection failed)."""
    events: list = []
    try:
        for chunk in chunks:
            got = conn.receive_data(chunk)
            for event in got:  # a block marked plain skips the proxy's field checks: none fail
                if http2_native.fields_checked(event):
                    assert not _field_refused(event.headers), event
            events.extend(got)
    except StreamIDTooLowError:
        return normal(events) + [("stream id too low",)], True
    except ProtocolError:
        return normal(events), True
    return normal(events), False


def normal(events: list) -> list:
    """What the sessions read of each event (the proxy handles no other kinds). DATA's
    flow-controlled length is left out: nghttp2 gives padding's window back itself."""
    out: list = []
    for event in events:
        kind = type(event)
        if kind is DataReceived:
            out.append(("data", event.stream_id, event.data))
        elif kind in (RequestReceived, ResponseReceived):
            ended = event.stream_ended is not None
            out.append((kind.__name__, event.stream_id, tuple(event.headers), ended))
        elif kind is InformationalResponseReceived:
            out.append(("informational", event.stream_id, tuple(event.headers)))
        elif kind is TrailersReceived:
            out.append(("trailers", event.stream_id, tuple(event.headers)))
        elif kind is StreamEnded:
            out.append(("end", event.stream_id))
        elif kind is StreamReset:
            out.append(("reset", event.stream_id, event.error_code, event.remote_reset))
        elif kind is WindowUpdated:
            out.append(("window", event.stream_id, event.delta))
        elif kind is RemoteSettingsChanged:
            out.append(("settings",))
        elif kind is ConnectionTerminated:
            out.append(("goaway",))  # h2 only: the sessions ignore it, see agree()
    return out


def agree(
    make_h2: Callable[[], H2Connection],
    make_native: Callable[[], http2_native.NativeH2Connection],
    chunks: list[bytes],
) -> tuple[list, bool]:
    """Both codecs' outcome of the same reads; equal, except that on input both reject, nghttp2
    may reject as soon as a frame header shows it (h2 waits for the whole frame), so what the
    native codec reported before failing is a prefix of what h2 did. Returns h2's outcome."""
    expected = outcome(make_h2(), chunks)
    events, failed = outcome(make_native(), chunks)
    reference = [e for e in expected[0] if e != ("goaway",)]
    if ("goaway",) in expected[0]:
        # After the peer's GOAWAY h2 takes no further frame on any stream, while nghttp2 goes on
        # and judges the GOAWAY's last stream id: the two agree up to the GOAWAY.
        seen = expected[0].index(("goaway",))
        if failed:  # what the failing read reported is lost
            seen = min(seen, len(events))
        assert events[:seen] == reference[:seen], (events, expected)
        return reference[:seen], True
    if failed and not expected[1] and _native_stricter(expected[0], b"".join(chunks)):
        assert events == reference[: len(events)], (events, expected)
        return reference, True
    if expected[1] and not failed and _h2_stricter(expected[0], b"".join(chunks)):
        reference = [e for e in reference if e != ("stream id too low",)]
        assert reference == events[: len(reference)], (events, expected)
        return reference, True
    if failed != expected[1]:
        # Cut short inside a frame: one codec may judge a frame by its header where the other
        # waits for the body. Given the rest of that frame, both must agree.
        rest = _rest_of_last_frame(b"".join(chunks))
        if rest:
            expected = outcome(make_h2(), [*chunks, rest])
            events, failed = outcome(make_native(), [*chunks, rest])
            reference = [e for e in expected[0] if e != ("goaway",)]
    assert failed == expected[1], (events, expected)
    if failed:  # each fails at its own point: what one reported first, the other did too
        shorter = min(len(events), len(reference))
        assert events[:shorter] == reference[:shorter], (events, expected)
    else:
        assert events == reference, (events, expected)
    return reference, failed


def _native_stricter(events: list, wire: bytes) -> bool:
    """Input where the native codec fails the connection and h2, laxer than RFC 9113, does not:
    a client's PUSH_PROMISE (§8.4: a connection error; h2 ignores one on a stream not open), an
    RST_STREAM or WINDOW_UPDATE on an idle stream (§5.1; h2 ignores them), a SETTINGS frame of
    more than 32 entries (nghttp2's cap against SETTINGS floods), a request whose head ends it
    while its Content-Length promises a body (§8.1.1), a frame on a stream the client already
    ended (§5.1: h2 resets that stream with STREAM_CLOSED; nghttp2 ends the connection, which
    §5.4 allows)."""
    if _ends_before_its_length(events) or any(
        e[0] == "reset" and e[2] == 0x5 and not e[3] for e in events
    ):
        return True
    if not wire.startswith(PREFACE):
        return False
    opened = 0
    for kind, _, sid, length in _frames(wire)[0]:
        if kind == 0x5 or (kind == 0x4 and length > 6 * 32):
            return True
        if kind == 0x1:
            opened = max(opened, sid)
        elif kind in (0x3, 0x8) and sid and (sid > opened or not sid & 1):
            return True  # §5.1: RST_STREAM or WINDOW_UPDATE on an idle stream
    return False


def _h2_stricter(events: list, wire: bytes) -> bool:
    """Input where h2 fails the connection and nghttp2 does not: HEADERS opening a stream below
    one already opened (§5.1.1; nghttp2 ignores the frame, as it cannot tell it from a late one
    on a stream it closed), an ALTSVC frame sent to a server (RFC 7838 §4 says to ignore it; h2
    parses it and fails on a malformed one)."""
    if events[-1:] == [("stream id too low",)]:
        return True
    return wire.startswith(PREFACE) and any(frame[0] == 0xA for frame in _frames(wire)[0])


def _ends_before_its_length(events: list) -> bool:
    """A request whose head ends it while its Content-Length promises a body."""
    for event in events:
        if event[0] == "RequestReceived" and event[3]:
            lengths = [value for name, value in event[2] if name == b"content-length"]
            if lengths and int(lengths[0]):
                return True
    return False


def _frames(wire: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
    """(type, flags, stream id, length) of each frame header in ``wire``, and where the last
    frame ends."""
    headers = []
    pos = len(PREFACE) if wire.startswith(PREFACE) else 0
    while pos + 9 <= len(wire):
        sid = int.from_bytes(wire[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        length = int.from_bytes(wire[pos : pos + 3], "big")
        headers.append((wire[pos + 3], wire[pos + 4], sid, length))
        pos += 9 + length
    return headers, pos


def _rest_of_last_frame(wire: bytes) -> bytes:
    """What completes the frame ``wire`` ends inside (zeros), and the header block it ends inside
    (an empty CONTINUATION that ends it); b"" when it ends between frames and blocks."""
    rest = b""
    while True:
        headers, end = _frames(wire + rest)
        have = len(wire) + len(rest)
        if end == have:
            break
        rest += b"\0" * (end - have if end > have else 9 - (have - end))
    block = None
    for kind, flags, sid, _ in headers:
        if kind in (0x1, 0x5, 0x9):  # HEADERS, PUSH_PROMISE, CONTINUATION
            block = None if flags & 0x4 else sid  # END_HEADERS
    if block is not None:
        rest += (0).to_bytes(3, "big") + bytes((0x9, 0x4)) + block.to_bytes(4, "big")
    return rest


def _answer(conn: http2_native.NativeH2Connection, events: list, draw: Draw) -> None:
    """Answer every request the server accepted, in the ways the sessions do (head, DATA past the
    window, trailers, reset); a stream the peer already closed refuses, nothing else may fail."""
    for event in events:
        if event[0] != "RequestReceived":
            continue
        sid = event[1]
        try:
            conn.send_headers(sid, [(b":status", b"200"), (b"x-a", draw.blob(8))])
            conn.send_data(sid, b"x" * draw.below(70_000))
            how = draw.below(4)
            if how == 0:
                conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
            elif how == 1:
                conn.end_stream(sid)
            else:
                conn.reset_stream(sid, how - 2)
            conn.acknowledge_received_data(draw.below(100), sid)
            conn.data_to_send()
            conn.local_flow_control_window(sid)
        except StreamClosedError:
            pass
        conn.data_to_send()


def h2_native_frames(data: bytes) -> None:
    """Any bytes after the client preface and an empty SETTINGS frame, split anywhere: the native
    server codec agrees with h2, then answers what it accepted."""
    if not data:
        return
    stream = PREFACE + SettingsFrame(0).serialize() + data[1:]
    pieces = splits(stream, data[0])
    events, failed = agree(h2_server, native_server, pieces)
    if not failed:
        conn = native_server()
        outcome(conn, pieces)
        _answer(conn, events, Draw(data[1:]))


def h2_native_request(data: bytes) -> None:
    """A structured request: header fields (valid or not) HPACK-encoded, maybe a body, maybe
    trailers; the native server codec agrees with h2 on it however it is cut."""
    draw = Draw(data)
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")]
    for _ in range(draw.below(7)):
        headers.insert(draw.below(len(headers) + 1), _header(draw))
    block = Encoder().encode(headers, huffman=draw.flag())
    wire = PREFACE + _stream_one(block, draw.blob(30), _trailers(draw))
    agree(h2_server, native_server, splits(wire, draw.byte()))


def h2_native_response(data: bytes) -> None:
    """An upstream's structured response (maybe informational first, maybe a body and trailers)
    to a GET or a HEAD: the native client codec agrees with h2 on it however it is cut."""
    draw = Draw(data)
    request = [(b":method", b"HEAD"), *_GET[1:]] if draw.flag() else _GET
    wire = b""
    if draw.flag():
        wire += _stream_one(Encoder().encode([(b":status", b"103")]), b"", None, end=False)
    headers = [(b":status", draw.pick(_STATUSES))]
    for _ in range(draw.below(5)):
        name = draw.pick((b"content-length", b"x-a", b":status", b"connection", b"te", b""))
        value = draw.pick(_RESPONSE_VALUES) if draw.flag() else draw.blob(16)
        headers.insert(draw.below(len(headers) + 1), (name, value))
    wire += _stream_one(Encoder().encode(headers), draw.blob(8), _trailers(draw))
    agree(lambda: h2_client(request), lambda: native_client(request), splits(wire, draw.byte()))


def _trailers(draw: Draw) -> bytes | None:
    """An HPACK block of trailer fields (valid or not), or None for no trailers."""
    if not draw.flag():
        return None
    fields = [_header(draw) for _ in range(draw.below(3))]
    return Encoder().encode(fields)
