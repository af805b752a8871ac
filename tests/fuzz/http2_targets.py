"""HTTP/2 targets: the server side as the proxy runs it (FrameScanner in front of h2, set up
with the proxy's settings) never fails other than by a protocol error, each request it
accepts reaches an HTTP/1 upstream as exactly the request the filters saw, and each
response from an HTTP/2 upstream reaches an HTTP/1 downstream as itself."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import InformationalResponseReceived, RequestReceived, ResponseReceived
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes, Settings
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from fuzz.draw import Draw, splits
from fuzz.http1_targets import codec, serve, summary
from pyproxy.codec.events import END, ProtocolError, RequestHead, ResponseHead
from pyproxy.codec.http1 import CodecUsageError
from pyproxy.codec.http2 import (
    PREFACE,
    FrameScanner,
    HeaderBlockTooLarge,
    request_from_h2,
    response_from_h2,
)
from pyproxy.config import HttpSettings

_SETTINGS = HttpSettings()


def _server() -> tuple[H2Connection, FrameScanner]:
    """An h2 server connection configured as H2Session.open configures it."""
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    conn.local_settings = Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: _SETTINGS.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: _SETTINGS.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: _SETTINGS.max_header_bytes,
        },
    )
    conn.initiate_connection()
    conn.decoder.max_header_list_size = 4 * _SETTINGS.max_header_bytes + 32 * _SETTINGS.max_headers
    return conn, FrameScanner(_SETTINGS.max_header_bytes, server=True)


def _receive(pieces: list[bytes]) -> None:
    conn, scanner = _server()
    for piece in pieces:
        try:
            data, _goaways = scanner.feed(piece)
            events = conn.receive_data(data) if data else []
        except (HeaderBlockTooLarge, H2ProtocolError):
            return  # the session answers GOAWAY and closes
        conn.data_to_send()
        for event in events:
            if type(event) is RequestReceived:
                check_translation(event.headers, event.stream_ended is not None)


def check_translation(headers: list[tuple[bytes, bytes]], ended: bool) -> None:
    """What the HTTP/1 upstream parses is the RequestHead the filters saw, or nothing is sent."""
    head = request_from_h2(headers, ended)
    if isinstance(head, ProtocolError):
        return  # refused: never forwarded
    for backend in ("fast", "h11"):
        try:
            wire = bytes(codec(backend, "client").send(head))
        except CodecUsageError:
            continue  # refused to serialise: never forwarded
        for parser in ("fast", "h11"):
            got = summary(serve(codec(parser, "server"), [wire]))
            assert got and got[0][0] == "request", (backend, parser, head, wire, got)
            assert got[0][1:4] == (head.method, head.target, tuple(head.headers)), (
                backend,
                parser,
                head,
                got,
            )


def h2_frames(data: bytes) -> None:
    """Any bytes after the client preface and an empty SETTINGS frame, split anywhere."""
    if not data:
        return
    stream = PREFACE + SettingsFrame(0).serialize() + data[1:]
    pieces = splits(stream, data[0])
    assert _scanned(pieces) == _scanned([stream]), pieces
    _receive(pieces)


def _scanned(pieces: list[bytes]) -> tuple[bytes, list[bytes], bool]:
    """FrameScanner's output, GOAWAY payloads and verdict: the same however reads cut frames."""
    scanner = FrameScanner(_SETTINGS.max_header_bytes, server=True)
    kept, goaways = [], []
    try:
        for piece in pieces:
            out, lifted = scanner.feed(piece)
            kept.append(bytes(out))
            goaways += lifted
    except HeaderBlockTooLarge:
        return b"", [], False  # what passed before depends on the cut; the verdict must not
    return b"".join(kept), goaways, True


_PSEUDO = (b":method", b":path", b":scheme", b":authority", b":status", b":protocol", b":x")
_NAMES = (b"content-length", b"cookie", b"host", b"te", b"connection", b"x-a", b"content-type")
_METHODS = (b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b"GET /x", b"", b"g\te", b"PUT")
_PATHS = (b"/", b"/a?b=c", b"*", b"a", b"/a b", b"", b"//x", b"/\x00", b"/%2e%2e/")
_VALUES = (b"", b"0", b"10", b"trailers", b"a", b" a", b"a\r\nx: y", b"\x80", b"1, 2", b"-1")


def _header(draw: Draw) -> tuple[bytes, bytes]:
    kind = draw.below(4)
    if kind == 0:
        name = draw.pick(_PSEUDO)
    elif kind == 1:
        name = draw.pick(_NAMES)
    else:
        name = draw.blob(12)
    which = draw.below(4)
    if name == b":method" and which:
        return name, draw.pick(_METHODS)
    if name == b":path" and which:
        return name, draw.pick(_PATHS)
    return name, draw.pick(_VALUES) if which > 1 else draw.blob(24)


def h2_request(data: bytes) -> None:
    """A structured request: header fields (valid or not) HPACK-encoded, maybe a body."""
    draw = Draw(data)
    headers = [
        (b":method", draw.pick(_METHODS)),
        (b":scheme", b"http"),
        (b":path", draw.pick(_PATHS)),
        (b":authority", draw.pick((b"example.org", b"a b", b"", b"x:1", b"\x7f"))),
    ]
    for _ in range(draw.below(6)):
        field = _header(draw)
        headers.insert(draw.below(len(headers) + 1), field)
    block = Encoder().encode(headers, huffman=draw.flag())
    wire = _stream_one(block, draw.blob(30))
    _receive(splits(PREFACE + wire, draw.byte()))


def _stream_one(
    block: bytes, body: bytes, trailers: bytes | None = None, end: bool = True
) -> bytes:
    """SETTINGS, then stream 1: a HEADERS frame with ``block``, ``body`` as DATA if any, then the
    ``trailers`` block if any; the last frame ends the stream unless ``end`` is false."""
    frames = [HeadersFrame(1, block)]
    frames[0].flags.add("END_HEADERS")
    if body:
        frames.append(DataFrame(1, body))
    if trailers is not None:
        frames.append(HeadersFrame(1, trailers))
        frames[-1].flags.add("END_HEADERS")
    if end:
        frames[-1].flags.add("END_STREAM")
    return SettingsFrame(0).serialize() + b"".join(frame.serialize() for frame in frames)


_STATUSES = (b"200", b"204", b"304", b"404", b"100", b"103", b"101", b"99", b"1000", b"abc", b"")
_RESPONSE_VALUES = (b"0", b"3", b"-1", b"abc", b" 3", b"application/grpc", b"x")


def h2_response(data: bytes) -> None:
    """An upstream's HTTP/2 response as the proxy's client side reads it, then written to an
    HTTP/1 downstream: h2 rejects it, or the downstream parses exactly that response."""
    draw = Draw(data)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    conn.send_headers(1, request, end_stream=True)
    conn.data_to_send()
    headers = [(b":status", draw.pick(_STATUSES))]
    for _ in range(draw.below(5)):
        name = draw.pick((b"content-length", b"x-a", b":status", b"connection", b"te", b""))
        value = draw.pick(_RESPONSE_VALUES) if draw.flag() else draw.blob(16)
        headers.insert(draw.below(len(headers) + 1), (name, value))
    wire = _stream_one(Encoder().encode(headers), draw.blob(8))
    scanner = FrameScanner(_SETTINGS.max_header_bytes, server=False)
    try:
        events = conn.receive_data(scanner.feed(wire)[0])
    except (HeaderBlockTooLarge, H2ProtocolError):
        return
    for event in events:
        if type(event) in (ResponseReceived, InformationalResponseReceived):
            head = response_from_h2(event.headers)
            if head is not None:  # None: the proxy resets the stream and answers 502
                check_response(head)


def check_response(head: ResponseHead) -> None:
    """Sent to an HTTP/1 downstream that asked GET, the head parses back as itself."""
    get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    for backend in ("fast", "h11"):
        server = codec(backend, "server")
        server.receive_data(get)
        try:
            wire = bytes(server.send(head))
        except CodecUsageError:
            continue  # refused: the proxy answers 502 instead
        for parser in ("fast", "h11"):
            client = codec(parser, "client")
            client.send(RequestHead(b"GET", b"/", [(b"host", b"a")]))
            client.send(END)
            got = summary(client.receive_data(wire))
            assert got and got[0][0] == "response", (backend, parser, head, wire, got)
            assert got[0][1] == head.status, (backend, parser, head, got)
            names = [n for n, _ in got[0][3] if n not in (b"transfer-encoding", b"connection")]
            assert names == [n for n, _ in head.headers], (backend, parser, head, got)
