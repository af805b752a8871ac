"""The native HTTP/2 codec (libnghttp2) against hyper-h2: the same client byte streams, valid and
invalid, cut at every byte boundary, give the same events and the same verdicts on both; and
every nghttp2 session is freed with its connection."""

from __future__ import annotations

import gc
import random

import pytest
from conftest import require_capability
from fuzz.h2_native_targets import agree, h2_client, h2_server, native_client, native_server
from h2.events import WindowUpdated
from hostile import h2_frame
from hpack import Decoder, Encoder

from pyproxy.codec import http2_native
from pyproxy.codec.http2 import PREFACE, FrameScanner, HeaderBlockTooLarge

pytestmark = pytest.mark.usefixtures("_native_built")

_DATA, _HEADERS, _RST, _SETTINGS, _PING, _WINDOW, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x8, 0x9
_END_STREAM, _END_HEADERS, _PADDED = 0x1, 0x4, 0x8


@pytest.fixture(scope="module")
def _native_built() -> None:
    require_capability("the native HTTP/2 codec (libnghttp2-dev)", http2_native.AVAILABLE)


def _block(headers) -> bytes:
    return Encoder().encode(headers)


def _get(path: bytes = b"/a", extra=()) -> list:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", path),
        *extra,
    ]


def _post(extra=()) -> list:
    return [(b":method", b"POST"), *_get()[1:], *extra]


def _client(*frames: bytes) -> bytes:
    return PREFACE + h2_frame(_SETTINGS, 0, 0) + b"".join(frames)


def _headers(sid: int, headers, flags: int = _END_HEADERS) -> bytes:
    return h2_frame(_HEADERS, flags, sid, _block(headers))


def _padded_data(sid: int, data: bytes, pad: int, flags: int = 0) -> bytes:
    return h2_frame(_DATA, flags | _PADDED, sid, bytes((pad,)) + data + b"\0" * pad)


def _continued(sid: int, headers, cut: int) -> bytes:
    block = _block(headers)
    return h2_frame(_HEADERS, _END_STREAM, sid, block[:cut]) + h2_frame(
        _CONTINUATION, _END_HEADERS, sid, block[cut:]
    )


VALID = {
    "get": _client(_headers(1, _get(), _END_HEADERS | _END_STREAM)),
    "post-two-data-frames": _client(
        _headers(1, _post()),
        h2_frame(_DATA, 0, 1, b"hello "),
        h2_frame(_DATA, _END_STREAM, 1, b"world"),
    ),
    "post-with-trailers": _client(
        _headers(1, _post([(b"te", b"trailers")])),
        h2_frame(_DATA, 0, 1, b"body"),
        _headers(1, [(b"x-sum", b"1")], _END_HEADERS | _END_STREAM),
    ),
    "padded-data": _client(_headers(1, _post()), _padded_data(1, b"abc", 7, _END_STREAM)),
    "continuation": _client(_continued(1, _get(b"/c", [(b"x-long", b"v" * 40)]), 5)),
    "interleaved-streams-reset-window-ping": _client(
        _headers(1, _post()),
        _headers(3, _get(b"/b"), _END_HEADERS | _END_STREAM),
        h2_frame(_DATA, 0, 1, b"one"),
        h2_frame(_WINDOW, 0, 0, (1000).to_bytes(4, "big")),
        h2_frame(_PING, 0, 0, b"12345678"),
        h2_frame(_RST, 0, 1, (0x8).to_bytes(4, "big")),
    ),
    "content-length-matches": _client(
        _headers(1, _post([(b"content-length", b"3")])), h2_frame(_DATA, _END_STREAM, 1, b"abc")
    ),
    "unknown-frame-type-ignored": _client(
        h2_frame(0xEE, 0, 0, b"whatever"), _headers(1, _get(), _END_HEADERS | _END_STREAM)
    ),
    "reset-on-a-stream-never-opened": _client(
        _headers(5, _get(), _END_HEADERS | _END_STREAM),
        h2_frame(_RST, 0, 3, (0x8).to_bytes(4, "big")),
    ),
    "cookies-crumbs": _client(
        _headers(
            1, _get(extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")]), _END_HEADERS | _END_STREAM
        )
    ),
}

INVALID = {
    "uppercase-name": _client(_headers(1, _get(extra=[(b"X-Up", b"1")]), 5)),
    "connection-header": _client(_headers(1, _get(extra=[(b"connection", b"close")]), 5)),
    "te-not-trailers": _client(_headers(1, _get(extra=[(b"te", b"trailers, gzip")]), 5)),
    "no-path": _client(_headers(1, _get()[:3], 5)),
    "pseudo-after-regular": _client(_headers(1, [*_get()[:2], (b"x", b"1"), _get()[3]], 5)),
    "body-longer-than-content-length": _client(
        _headers(1, _post([(b"content-length", b"2")])), h2_frame(_DATA, _END_STREAM, 1, b"abc")
    ),
    "body-shorter-than-content-length": _client(
        _headers(1, _post([(b"content-length", b"9")])), h2_frame(_DATA, _END_STREAM, 1, b"abc")
    ),
    "trailers-without-end-stream": _client(
        _headers(1, _post()), h2_frame(_DATA, 0, 1, b"x"), _headers(1, [(b"x-t", b"1")])
    ),
    "data-on-stream-0": _client(h2_frame(_DATA, 0, 0, b"x")),
    "headers-on-even-stream": _client(_headers(2, _get(), 5)),
    "hpack-garbage": _client(h2_frame(_HEADERS, 5, 1, b"\xff\xff\xff\xff\xff")),
    "settings-bad-length": _client(h2_frame(_SETTINGS, 0, 0, b"\0\0\0")),
    "no-authority-nor-host": _client(_headers(1, [*_get()[:2], _get()[3]], 5)),
    "window-update-overflow": _client(
        h2_frame(_WINDOW, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")),
        h2_frame(_WINDOW, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")),
    ),
}


def _agree(chunks: list[bytes]) -> tuple[list, bool]:
    return agree(h2_server, native_server, chunks)


def _native() -> http2_native.NativeH2Connection:
    return native_server()


@pytest.mark.parametrize("name", [*VALID, *INVALID])
def test_both_codecs_agree_at_every_byte_boundary(name):
    data = VALID.get(name) or INVALID[name]
    assert _agree([data])[1] == (name in INVALID)
    for cut in range(1, len(data)):
        _agree([data[:cut], data[cut:]])


def test_one_byte_at_a_time_agrees_too():
    for data in (VALID["interleaved-streams-reset-window-ping"], VALID["padded-data"]):
        _agree([data[i : i + 1] for i in range(len(data))])


def test_every_session_is_freed_after_10000_connections():
    # Each connection gets as far as a request with a body and an answer queued, then is dropped
    # mid-stream (queued DATA still in C): sessions and their send queues go with it.
    live = http2_native.lib.pp_h2_live()
    request = VALID["post-two-data-frames"]
    for _ in range(10_000):
        conn = _native()
        conn.receive_data(request)
        conn.send_headers(1, [(b":status", b"200")])
        conn.send_data(1, b"x" * 100_000)
        conn.data_to_send()
        del conn
    gc.collect()
    assert http2_native.lib.pp_h2_live() == live


_GET_REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", b"a"),
]
_HEAD_REQUEST = [(b":method", b"HEAD"), *_GET_REQUEST[1:]]


def _upstream(*frames: bytes) -> bytes:
    return h2_frame(_SETTINGS, 0, 0) + b"".join(frames)


_INFORMATIONAL = _headers(1, [(b":status", b"103")])
RESPONSES = {
    "ok-with-body": (
        _GET_REQUEST,
        _upstream(_headers(1, [(b":status", b"200")]), h2_frame(_DATA, _END_STREAM, 1, b"abc")),
        False,
    ),
    "informational-then-final": (
        _GET_REQUEST,
        _upstream(_INFORMATIONAL, _headers(1, [(b":status", b"204")], 5)),
        False,
    ),
    "content-length-matches": (
        _GET_REQUEST,
        _upstream(
            _headers(1, [(b":status", b"200"), (b"content-length", b"3")]),
            h2_frame(_DATA, _END_STREAM, 1, b"abc"),
        ),
        False,
    ),
    "head-answer-with-content-length-no-body": (
        _HEAD_REQUEST,
        _upstream(_headers(1, [(b":status", b"200"), (b"content-length", b"9")], 5)),
        False,
    ),
    "trailers-after-final": (
        _GET_REQUEST,
        _upstream(
            _headers(1, [(b":status", b"200")]),
            h2_frame(_DATA, 0, 1, b"x"),
            _headers(1, [(b"grpc-status", b"0")], 5),
        ),
        False,
    ),
    "data-after-informational": (
        _GET_REQUEST,
        _upstream(_INFORMATIONAL, h2_frame(_DATA, _END_STREAM, 1, b"abc")),
        True,
    ),
    "end-stream-on-informational": (
        _GET_REQUEST,
        _upstream(_headers(1, [(b":status", b"100")], 5)),
        True,
    ),
    "head-answer-with-a-body": (
        _HEAD_REQUEST,
        _upstream(_headers(1, [(b":status", b"200")]), h2_frame(_DATA, _END_STREAM, 1, b"abc")),
        True,
    ),
    "body-longer-than-content-length": (
        _GET_REQUEST,
        _upstream(
            _headers(1, [(b":status", b"200"), (b"content-length", b"2")]),
            h2_frame(_DATA, _END_STREAM, 1, b"abc"),
        ),
        True,
    ),
    "content-length-not-digits": (
        _GET_REQUEST,
        _upstream(_headers(1, [(b":status", b"200"), (b"content-length", b"x")], 5)),
        True,
    ),
    "first-block-without-status": (_GET_REQUEST, _upstream(_headers(1, [(b"x-a", b"1")], 5)), True),
    "trailers-after-informational-only": (
        _GET_REQUEST,
        _upstream(_INFORMATIONAL, _headers(1, [(b"x-a", b"1")], 5)),
        True,
    ),
    "status-in-trailers": (
        _GET_REQUEST,
        _upstream(_headers(1, [(b":status", b"200")]), _headers(1, [(b":status", b"200")], 5)),
        True,
    ),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_both_client_codecs_agree_on_upstream_responses(name):
    request, data, invalid = RESPONSES[name]
    both = (lambda: h2_client(request), lambda: native_client(request))
    assert agree(*both, [data])[1] == invalid
    for cut in range(1, len(data)):
        agree(*both, [data[:cut], data[cut:]])


def test_empty_content_length_in_request_trailers_fails_on_both():
    data = _client(
        _headers(1, _post()),
        h2_frame(_DATA, 0, 1, b"x"),
        _headers(1, [(b"content-length", b"")], _END_HEADERS | _END_STREAM),
    )
    assert _agree([data])[1]


@pytest.mark.parametrize(
    ("extra", "form"),
    [
        ([(b"x-a", b"b c")], http2_native._PLAIN),  # NUL-joined across the boundary
        ([(b"x-a", b"b\0c"), (b"x-\0", b"")], 0),  # a NUL byte: length-prefixed instead
        ([(b"", b"")], http2_native._PLAIN),
    ],
)
def test_sent_header_blocks_reach_the_peer_as_given_in_either_form(extra, form):
    # What the native codec sends, hyper-h2 decodes: both packed forms carry every byte.
    request = [*_GET_REQUEST, *extra]
    assert http2_native.pack_headers(request)[1] == form
    client = http2_native.NativeH2Connection(True, 1000)
    client.initiate({}, 65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, request)
    client.send_data(sid, b"x")
    client.send_headers(sid, [(b"grpc-status", b"0"), *extra], end_stream=True)  # trailers
    wire, decoder, blocks = client.data_to_send()[len(PREFACE) :], Decoder(), []
    while wire:
        length, kind = int.from_bytes(wire[:3], "big"), wire[3]
        if kind == _HEADERS:
            blocks.append(decoder.decode(wire[9 : 9 + length], raw=True))
        wire = wire[9 + length :]
    assert blocks == [request, [(b"grpc-status", b"0"), *extra]]


def test_trailers_queued_before_the_request_headers_left_follow_them():
    # A request of headers and trailers only, both queued before the HEADERS frame was sent:
    # the trailers were dropped (nghttp2 refused them on a stream not open yet).
    client = http2_native.NativeH2Connection(True, 1000)
    client.initiate({}, 65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, _GET_REQUEST)
    client.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    server = h2_server()
    events = server.receive_data(client.data_to_send())
    trailers = [e for e in events if type(e).__name__ == "TrailersReceived"]
    assert [e.headers for e in trailers] == [[(b"grpc-status", b"0")]]
    assert trailers[0].stream_ended is not None


def test_received_plain_blocks_split_back_into_their_fields():
    server = http2_native.NativeH2Connection(False, 1000)
    server.initiate({}, 65535)
    request = [*_GET_REQUEST, (b"x-a", b"b c"), (b"x-empty", b"")]
    events = server.receive_data(PREFACE + _upstream(_headers(1, request, 5)))
    (received,) = [e for e in events if hasattr(e, "headers")]
    assert http2_native.fields_checked(received)
    assert received.headers == request


def test_window_updates_make_events_only_while_the_owner_waits_for_them():
    # The session says per read whether anything of its own waits for flow-control credit;
    # without, WINDOW_UPDATE frames (C's queues move on them anyway) make no event.
    server = http2_native.NativeH2Connection(False, 1000)
    server.initiate({}, 65535)
    server.receive_data(PREFACE + _upstream(_headers(1, _GET_REQUEST, 5)))
    updates = h2_frame(_WINDOW, 0, 0, (1000).to_bytes(4, "big")) + h2_frame(
        _WINDOW, 0, 1, (1000).to_bytes(4, "big")
    )
    server.window_events = False
    assert not [e for e in server.receive_data(updates) if isinstance(e, WindowUpdated)]
    server.window_events = True
    got = [
        (e.stream_id, e.delta) for e in server.receive_data(updates) if isinstance(e, WindowUpdated)
    ]
    assert got == [(0, 1000), (1, 1000)]


def test_the_codec_says_when_a_read_or_an_acknowledgement_leaves_bytes_to_send():
    # The sessions flush only then: a SETTINGS frame needs its ACK, a small acknowledgement
    # sends nothing (nghttp2 updates the window once half of it is consumed), a large one does.
    server = http2_native.NativeH2Connection(False, 1000)
    server.initiate({}, 65535)
    server.receive_data(PREFACE + _upstream(_headers(1, _post(), 4)))
    assert server.output_pending  # the SETTINGS ACK
    server.data_to_send()
    server.receive_data(h2_frame(_DATA, 0, 1, b"x" * 100))
    assert not server.output_pending
    server.acknowledge_received_data(100, 1)
    assert not server.output_pending
    server.receive_data(h2_frame(_DATA, 0, 1, b"y" * 16384) * 2)
    server.acknowledge_received_data(32768, 1)
    assert server.output_pending
    assert h2_frame(_WINDOW, 0, 1, (32868).to_bytes(4, "big")) in server.data_to_send()


def _scanner_walk(stream: bytes, cuts: list[int], scan) -> tuple:
    """What a FrameScanner makes of ``stream`` read in the pieces ``cuts`` marks: the bytes it
    passes, the GOAWAYs it lifts, where it found a header block too large, and its end state."""
    scanner = FrameScanner(3000, server=False, scan=scan)
    out, goaways, failed = [], [], None
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        try:
            data, found = scanner.feed(stream[start:end])
        except HeaderBlockTooLarge as exc:
            failed = (start, exc.args)
            break
        out.append(data)
        goaways += found
    return b"".join(out), goaways, failed, scanner._left, scanner._block, scanner._carry


@pytest.mark.parametrize("seed", range(40))
def test_the_native_frame_walk_leaves_what_the_python_one_does(seed):
    """pp_h2_scan (FrameScanner's walk in C over a read with nothing to cut) against the Python
    walk, over random frame sequences (header blocks in CONTINUATIONs, some past the limit,
    GOAWAYs) read in random pieces and in single bytes."""
    rng = random.Random(seed)
    frames = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.choice([_DATA, _HEADERS, _CONTINUATION, _PING, _WINDOW, 0x7, 0x5])
        flags = rng.choice([0, _END_HEADERS, _END_STREAM, _END_HEADERS | _END_STREAM])
        frames.append(h2_frame(kind, flags, 1, bytes(rng.randrange(0, 1400))))
    stream = b"".join(frames)
    for cuts in (
        sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6)))),
        list(range(1, len(stream))) if len(stream) < 600 else [9, 10, 18, 27],
        [],
    ):
        native = _scanner_walk(stream, cuts, http2_native.lib.pp_h2_scan)
        assert native == _scanner_walk(stream, cuts, None)
