"""Hostile HTTP/2 input through a running proxy: malformed requests (RFC 9113 §8.1.1, §8.2,
§8.3) and floods. Each gets its documented answer and moves the rejected-input counter for its
reason; nothing of it reaches the HTTP/1 upstream; a normal request is served after it."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from conftest import ProxyProcess, http_get
from hostile import (
    H2_PREFACE_SETTINGS,
    RawH2Client,
    RecordingUpstream,
    RejectionCheck,
    h2_frame,
    module_proxy,
)

PROTOCOL_ERROR, ENHANCE_YOUR_CALM = 0x1, 0xB
_HEADERS, _RST_STREAM, _CONTINUATION = 0x1, 0x3, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4


def _request(method=b"GET", path=b"/h", scheme=b"http", authority=b"x", extra=()):
    pseudo = [(b":method", method), (b":scheme", scheme), (b":authority", authority)]
    pseudo = [field for field in pseudo if field[1] is not None]
    if path is not None:
        pseudo.append((b":path", path))
    return pseudo + list(extra)


# What goes into the HTTP/1 request line is checked by the proxy: a stream error.
PSEUDO_HEADERS = {
    "method-carries-a-target": _request(method=b"GET /admin/secret"),
    "method-with-tab": _request(method=b"GET\t/x"),
    "path-with-space": _request(path=b"/pub /admin HTTP/1.1"),
    "path-with-tab": _request(path=b"/a\tb"),
    "path-without-slash": _request(path=b"pub"),
    "path-asterisk-not-options": _request(path=b"*"),
    "path-non-ascii": _request(path=b"/\xff"),
    "authority-with-space": _request(authority=b"x y"),
    "authority-with-userinfo": _request(authority=b"user@x"),
    "authority-with-path": _request(authority=b"x/evil"),
    "scheme-not-a-scheme": _request(scheme=b"ht tp"),
    "scheme-not-http": _request(scheme=b"ftp"),
}

# Field and pseudo-header rules h2 enforces itself (RFC 9113 §8.2, §8.3): it ends the connection
# with GOAWAY PROTOCOL_ERROR (a stream error may always be treated as a connection error, §5.4.1).
CONNECTION_ERRORS = {
    "path-with-crlf": _request(path=b"/a\r\nX-Injected: 1"),
    "authority-with-crlf": _request(authority=b"x\r\nX-Injected: 1"),
    "path-empty": _request(path=b""),
    "no-method": _request(method=None),
    "no-path": _request(path=None),
    "no-scheme": _request(scheme=None),
    "duplicate-path": _request(extra=[(b":path", b"/b")]),
    "unknown-pseudo-header": _request(extra=[(b":foo", b"b")]),
    "pseudo-after-regular": [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"x-a", b"1"),
        (b":path", b"/h"),
    ],
    "uppercase-name": _request(extra=[(b"X-Upper", b"1")]),
    "connection-header": _request(extra=[(b"connection", b"close")]),
    "te-not-trailers": _request(extra=[(b"te", b"gzip")]),
    "transfer-encoding": _request(extra=[(b"transfer-encoding", b"chunked")]),
    "keep-alive-header": _request(extra=[(b"keep-alive", b"1")]),
    "upgrade-header": _request(extra=[(b"upgrade", b"websocket")]),
    "value-with-crlf": _request(extra=[(b"x-a", b"a\r\nX-Injected: 1")]),
    "value-with-lf": _request(extra=[(b"x-a", b"a\nb")]),
    "value-with-nul": _request(extra=[(b"x-a", b"a\x00b")]),
    "value-leading-space": _request(extra=[(b"x-a", b" a")]),
    "name-with-space": _request(extra=[(b"x a", b"1")]),
    "name-with-colon": _request(extra=[(b"x:a", b"1")]),
    "name-empty": _request(extra=[(b"", b"1")]),
    "host-differs-from-authority": _request(extra=[(b"host", b"other")]),
}


@pytest.fixture(scope="module", params=[False, True], ids=["lane-off", "lane-on"])
def hostile_h2(tmp_path_factory, h2_codec, request):
    upstream = RecordingUpstream()
    settings = (
        "    http:\n      rapid_reset_max: 20\n      request_header_timeout: 300ms\n"
        f"      http2_codec: {h2_codec}\n      http2_lane: {'true' if request.param else 'false'}\n"
    )
    proxy, port = module_proxy(tmp_path_factory.mktemp("h2"), "http", upstream.address, settings)
    yield RejectionCheck(proxy, upstream, port)
    proxy.stop()
    upstream.close()


def _send_request(port: int, headers, body: bytes | None = None):
    def send():
        client = RawH2Client(port)
        try:
            client.conn.send_headers(1, headers, end_stream=body is None)
            if body is not None:
                client.conn.send_data(1, body, end_stream=True)
            client.send()
            return client.outcome()
        finally:
            client.close()

    return send


# Each malformed request: (the proxy's answer, the rejected-input reason).
ANSWERS = {name: (("reset", PROTOCOL_ERROR), "pseudo_header") for name in PSEUDO_HEADERS}
ANSWERS.update({name: (("goaway", PROTOCOL_ERROR), "h2_protocol") for name in CONNECTION_ERRORS})


@pytest.mark.parametrize("name", list(ANSWERS))
def test_a_malformed_request_gets_its_documented_answer(hostile_h2, name):
    headers = PSEUDO_HEADERS.get(name) or CONNECTION_ERRORS[name]
    answer, reason = ANSWERS[name]
    outcome, reached = hostile_h2.run(_send_request(hostile_h2.port, headers), reason)
    assert outcome == answer
    assert reached == b""


def test_a_body_longer_than_its_content_length_ends_the_connection(hostile_h2):
    headers = _request(method=b"POST", extra=[(b"content-length", b"2")])
    outcome, reached = hostile_h2.run(
        _send_request(hostile_h2.port, headers, b"abcdef"), "h2_protocol"
    )
    assert outcome == ("goaway", PROTOCOL_ERROR)
    assert b"abcdef" not in reached


def test_a_head_that_ends_the_stream_but_promises_a_body_never_reaches_the_upstream(
    hostile_h2, h2_codec
):
    # Forwarded, it would be an HTTP/1 head whose 5-byte body the next request would supply.
    headers = _request(method=b"POST", extra=[(b"content-length", b"5")])
    # nghttp2 refuses it itself (a connection error); with hyper-h2 the proxy resets the stream.
    answer, reason = {
        "native": (("goaway", PROTOCOL_ERROR), "h2_protocol"),
        "h2": (("reset", PROTOCOL_ERROR), "header"),
    }[h2_codec]
    outcome, reached = hostile_h2.run(_send_request(hostile_h2.port, headers), reason)
    assert outcome == answer
    assert reached == b""


def test_connect_is_answered_501(hostile_h2):
    headers = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
    outcome, reached = hostile_h2.run(_send_request(hostile_h2.port, headers), "method")
    assert outcome == ("status", 501)
    assert reached == b""


def test_rapid_reset_gets_goaway_enhance_your_calm(hostile_h2):
    def send():
        client = RawH2Client(hostile_h2.port)
        try:
            for i in range(30):
                sid = 1 + 2 * i
                client.conn.send_headers(sid, _request(path=b"/rapid"), end_stream=True)
                client.conn.reset_stream(sid, 0x8)
            client.send()
            return client.outcome(stream_id=0)
        finally:
            client.close()

    outcome, _ = hostile_h2.run(send, "h2_flood", valid_path="/rapid")
    assert outcome == ("goaway", ENHANCE_YOUR_CALM)


def test_a_continuation_flood_gets_goaway_enhance_your_calm(hostile_h2):
    def send():
        client = RawH2Client(hostile_h2.port)
        try:
            client.send(h2_frame(_HEADERS, _END_STREAM, 1, b"\x82"))
            filler = h2_frame(_CONTINUATION, 0, 1, b"\x00" * 16384)
            try:
                for _ in range(200):  # 3 MB of a header block that never ends
                    client.sock.sendall(filler)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return client.outcome(stream_id=0)
        finally:
            client.close()

    outcome, reached = hostile_h2.run(send, "h2_flood")
    assert outcome in (("goaway", ENHANCE_YOUR_CALM), ("closed", -1))
    assert reached == b""


def test_empty_data_frames_never_end_the_upstream_body_early(hostile_h2):
    # An empty DATA frame must not become HTTP/1's last-chunk: the rest would be a second request.
    client = RawH2Client(hostile_h2.port)
    mark = len(hostile_h2.upstream.received)
    client.conn.send_headers(1, _request(method=b"POST", path=b"/echo"))
    client.conn.send_data(1, b"abc")
    client.send(h2_frame(0x0, 0, 1) * 5000)
    client.conn.send_data(1, b"def", end_stream=True)
    client.send()
    assert client.outcome() == ("status", 200)
    client.close()
    received = hostile_h2.upstream.received_since(mark)
    assert received.endswith(b"\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"), received


def _fd_count(proxy: ProxyProcess) -> int:
    pids = [proxy.proc.pid] + [int(p) for p in _children(proxy.proc.pid)]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


@pytest.mark.parametrize(
    "frame",
    [h2_frame(0x4, 0, 0), h2_frame(0x6, 0, 0, b"12345678")],
    ids=["settings-flood", "ping-flood"],
)
def test_a_control_frame_flood_by_a_client_that_never_reads_leaks_nothing(hostile_h2, frame):
    # The proxy stops reading a flooder that does not read its acks, gives up on it (request
    # header timeout), and the flooder resets: every fd comes back and the next connections,
    # which may get the flooder's fd number, are served. (test_stream_close.py and
    # test_accept_path.py pin down the fd-number reuse itself, deterministically.)
    proxy, port = hostile_h2.proxy, hostile_h2.port
    assert http_get(f"http://127.0.0.1:{port}/warm")[0] == 200
    fds_before = _fd_count(proxy)
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(1.0)
        sock.sendall(H2_PREFACE_SETTINGS)
        burst = frame * 1000
        try:
            while True:  # until the proxy stops reading us
                sock.sendall(burst)
        except (TimeoutError, OSError):
            pass
        time.sleep(0.5)  # past the header timeout: the proxy closes once its acks are out
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        for _ in range(3):
            assert http_get(f"http://127.0.0.1:{port}/next", timeout=3)[0] == 200
    snap = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert snap["connections_active"] == 0, snap
    deadline = time.monotonic() + 5
    while _fd_count(proxy) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count(proxy) <= fds_before
    assert "RuntimeError" not in proxy.output


def test_request_trailers_after_a_content_length_reach_an_http1_upstream(hostile_h2):
    # A request announcing trailers (RFC 9110 §6.6.2) goes chunked on the HTTP/1.1 hop, so they
    # can follow its body there; its Content-Length cannot frame them.
    client = RawH2Client(hostile_h2.port)
    mark = len(hostile_h2.upstream.received)
    extra = [(b"content-length", b"5"), (b"trailer", b"x-checksum")]
    client.conn.send_headers(1, _request(method=b"POST", path=b"/echo", extra=extra))
    client.conn.send_data(1, b"hello")
    client.conn.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
    client.send()
    assert client.outcome() == ("status", 200)
    client.close()
    received = hostile_h2.upstream.received_since(mark)
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head, head
    assert body == b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n", body


def test_a_body_shorter_than_its_content_length_before_trailers_never_ends_upstream(hostile_h2):
    # Both codecs judge a body that ends with DATA; one that ends with trailers is judged by the
    # proxy: malformed (RFC 9113 §8.1.1), reset, and what went upstream never ends as a request.
    extra = [(b"content-length", b"5"), (b"trailer", b"x-checksum")]

    def send():
        client = RawH2Client(hostile_h2.port)
        try:
            client.conn.send_headers(1, _request(method=b"POST", path=b"/echo", extra=extra))
            client.conn.send_data(1, b"hel")
            client.conn.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
            client.send()
            return client.outcome()
        finally:
            client.close()

    flags = hostile_h2.proxy.listener()["flags"]
    outcome, reached = hostile_h2.run(send, "framing")
    assert outcome == ("reset", PROTOCOL_ERROR)
    assert b"x-checksum: abc" not in reached and b"0\r\n\r\n" not in reached
    after = hostile_h2.proxy.listener()["flags"]
    changed = {k: after[k] - flags.get(k, 0) for k in after if after[k] != flags.get(k, 0)}
    assert changed == {"DPE": 1}  # the proxy's reset: not the client's (DR)
