"""The default HTTP/1 backend: llhttp (via httptools) parses, a byte-constant serialiser writes.

What this backend does differently from the h11 one (documented, tested):

- Trailers: llhttp reports trailer fields through the same header callback
  after the last chunk, so they are surfaced as a Trailers event, like h11.
- Methods: llhttp only knows the methods in its table and cannot tell an
  unknown token from garbage, so any other method is a 400 (h11 accepts any
  token method and leaves the 501 to the proxy).
- Pipelining: llhttp cannot stop mid-buffer, so a chunk holding several
  requests is parsed at once and the later cycles' events are queued; the
  proxy still only sees them after ``start_next_cycle`` (same contract).
- HEAD and CONNECT responses: llhttp's response parser cannot be told the
  request method, so for those the head is delimited here (up to CRLFCRLF)
  and only the head is given to llhttp (RFC 9112 §6.3 (1), (2)).
- A single header line larger than one read is buffered by llhttp until it
  completes; the limit is then enforced, so at most one read too many is held.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

import httptools

from pyproxy.codec.chunk_lines import ChunkLines
from pyproxy.codec.events import (
    END,
    Body,
    Buffer,
    Headers,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Trailers,
)
from pyproxy.codec.http1 import (
    _FACT_NAMES,
    CHUNKED,
    DEFAULT_LIMITS,
    DONE,
    FIELD_CONTROL,
    IDLE,
    LENGTH,
    NO_BODY,
    NOT_TRAILERS,
    SEND_BODY,
    UNTIL_CLOSE,
    CodecUsageError,
    HeadFacts,
    Http1Codec,
    Http1Limits,
    Role,
    strip_hop_by_hop,
    strip_hop_by_hop_lines,
)
from pyproxy.native import http1_head_scanner
from pyproxy.protocol import HOP_BY_HOP, NO_BODY_METHOD, NO_BODY_STATUSES, has_body

# The native head scanner (pyproxy.native._http1head) when built and not disabled.
_scan_head = http1_head_scanner()

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
_EARLY: Final = "response bytes before a request"
_CRLF: Final = b"\r\n"
_SEP: Final = b": "
_HEAD_END: Final = b"\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_LAST_CHUNK_OPEN: Final = b"0\r\n"
_REQUEST_LINE_TAIL: Final = b" HTTP/1.1\r\n"
_TE_CHUNKED: Final = (b"transfer-encoding", b"chunked")
_CONN_CLOSE: Final = (b"connection", b"close")
_CONN_KEEP_ALIVE: Final = (b"connection", b"keep-alive")
_WATCHED: Final = _FACT_NAMES | HOP_BY_HOP

# Status lines for the common codes, built once (RFC 9110 §15 reason phrases).
_PHRASES: Final = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_STATUS_LINES: Final = {
    code: (phrase, b"HTTP/1.1 %d %s\r\n" % (code, phrase)) for code, phrase in _PHRASES.items()
}


class _Reject(Exception):
    """Raised inside an llhttp callback to stop parsing with a chosen status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FastHttp1Codec(Http1Codec):
    """Http1Codec on llhttp; the codec object itself is the httptools callback target."""

    __slots__ = (
        "_parser",
        "_dead",
        "_raw",
        "_headbuf",
        "_facts",
        "_headers",
        "_trailers",
        "_url",
        "_reason",
        "_count",
        "_size",
        "_in_message",
        "_in_head",
        "_in_trailers",
        "_head_fed",
        "_tail",
        "_body_left",
        "_chunks",
        "_status",
        "_final_seen",
        "_message_done",
        "_until_close",
        "_wire_src",
        "_hop",
        "_left",
        "_scanner",
    )

    def __init__(
        self, role: Role, limits: Http1Limits = DEFAULT_LIMITS, native_scan: bool = True
    ) -> None:
        super().__init__(role, limits)
        # The native head scanner, unless unavailable or switched off (tests: the llhttp path).
        self._scanner = _scan_head if native_scan else None
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = (
            self._new_parser()
        )
        self._dead = False
        # Bytes llhttp must not see: after an Upgrade/CONNECT head (raw relay
        # or, if declined, re-parsed next cycle).
        self._raw: bytearray | None = None
        # Response head being delimited by hand (HEAD / CONNECT requests).
        self._headbuf = bytearray()
        self._facts = HeadFacts()
        self._headers: Headers = []
        self._trailers: Headers = []
        self._url = b""
        self._reason = b""
        self._count = 0
        self._size = 0
        self._in_message = False
        self._in_head = False
        self._in_trailers = False
        self._head_fed = 0
        # The last bytes fed to llhttp (a CRLFCRLF may straddle two reads) and the
        # Content-Length body still due on llhttp's path (-1: none or not by length).
        self._tail = b""
        self._body_left = -1
        # The chunked body llhttp is parsing, followed to find its trailer section's bytes.
        self._chunks: ChunkLines | None = None
        self._status = 0
        self._final_seen = False
        self._message_done = False
        self._until_close = False
        # The buffer being fed when it starts at a message boundary: the head's wire bytes.
        self._wire_src: bytes | None = None
        self._hop = False  # a hop-by-hop field was seen in this head
        # Body bytes still due for a message whose head the native scanner took (-1: none).
        self._left = -1

    @property
    def at_rest(self) -> bool:
        return (
            self._their is IDLE
            and self._our is IDLE
            and not self._pending
            and not self._in_message
            and self._left < 0
            and self._raw is None
            and not self._headbuf
        )

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        if self.role == "server":
            return httptools.HttpRequestParser(self)
        return httptools.HttpResponseParser(self)

    # -- llhttp callbacks (names fixed by httptools) --------------------------

    def on_message_begin(self) -> None:
        if self._message_done and self.role == "client":
            raise _Reject(400, _EARLY)  # we never pipeline: an answer to no request
        self._in_message = self._in_head = True
        self._in_trailers = self._message_done = False
        self._head_fed = self._count = self._size = 0
        self._facts = HeadFacts()
        self._headers = []
        self._trailers = []
        self._url = self._reason = b""
        self._hop = False
        self._chunks = None

    def on_url(self, url: bytes) -> None:
        # Over the limits is decided when the head ends (its raw bytes bound what is kept):
        # llhttp calls back when a span ends or a read does, so an earlier verdict would
        # depend on the split.
        self._url += url
        self._size += len(url)

    def on_status(self, reason: bytes) -> None:
        # RFC 9112 §4: HTAB, SP, VCHAR and obs-text only; llhttp lets other controls by.
        if FIELD_CONTROL.search(reason):
            raise _Reject(400, "control character in reason phrase")
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        name = name.lower()
        if value and (value[-1] == 32 or value[-1] == 9):
            value = value.rstrip(b" \t")  # llhttp can leave trailing OWS (RFC 9110 §5.5)
        self._size += len(name) + len(value) + 4  # measured as head_size does (no OWS)
        if self._in_trailers:
            # Judged at the section's end (on_message_complete), as a head is at its end.
            self._trailers.append((name, value))
            return
        if name in _WATCHED:
            if name in _FACT_NAMES:
                err = self._facts.add(name, value)
                if err is not None:
                    raise _Reject(err.status, err.reason)
            if name in HOP_BY_HOP:
                self._hop = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        self._in_head = False
        limits = self.limits
        if self._count > limits.max_header_count or self._size > limits.max_header_bytes:
            raise _Reject(431, "header section over limits")
        raw_version = parser.get_http_version()
        version = _VERSIONS.get(raw_version) or raw_version.encode("ascii")
        head: RequestHead | ResponseHead | ProtocolError
        if self.role == "server":
            method = parser.get_method()  # type: ignore[union-attr]  # server role: a request parser
            head = self._facts.request_head(method, self._url, self._headers, version)
            if isinstance(head, ProtocolError):
                raise _Reject(head.status, head.reason)
        else:
            status = parser.get_status_code()  # type: ignore[union-attr]
            if status == 101 and not self._upgrade:
                raise _Reject(400, "101 without an Upgrade offer")
            self._status = status
            head = self._facts.response_head(
                status, self._reason, self._headers, version, self._method
            )
            if isinstance(head, ProtocolError):
                raise _Reject(head.status, head.reason)
            if status >= 200:
                self._final_seen = True
                self._until_close = not head.keep_alive and (
                    head.content_length is None and not head.chunked
                )
        if self._wire_src is not None:
            self._keep_wire(head, version)
        self._body_left = -1 if head.chunked else head.content_length or -1
        if head.chunked and (type(head) is RequestHead or has_body(self._status, self._method)):
            self._chunks = ChunkLines(limits.max_header_bytes)
        self._pending.append(head)
        # Trailers get their own budget (RFC 9112 §7.1.2 puts them after the body).
        self._count = self._size = 0
        self._in_trailers = True

    def _keep_wire(self, head: RequestHead | ResponseHead, version: bytes) -> None:
        """Give a head that arrived whole its wire bytes, when its framing lets them be forwarded.

        Only HTTP/1.1 heads framed by Content-Length (or bodiless): chunked, upgrade and
        read-until-close messages are re-framed on the way out, so they are serialised anew.
        """
        src, self._wire_src = self._wire_src, None
        if version != b"1.1" or head.chunked or src is None or src[0] == 13 or src[0] == 10:
            return
        if type(head) is RequestHead:
            # llhttp reads words between runs of spaces (RFC 9112 §3 allows it): such a request
            # line is re-serialised, never passed on as it came.
            line = b"%s %s HTTP/1.1\r\n" % (head.method, head.target)
            if head.upgrade or not src.startswith(line):
                return
        elif head.content_length is None and head.status not in NO_BODY_STATUSES:  # type: ignore[union-attr]
            return
        elif head.status < 200 or head.status == 101:  # type: ignore[union-attr]
            return
        raw = bytes(src[: src.find(_HEAD_END) + 4])
        head.wire = strip_hop_by_hop_lines(raw, head.headers) if self._hop else raw

    def on_body(self, body: bytes) -> None:
        if self._body_left > 0:
            self._body_left -= len(body)
        self._pending.append(Body(body))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._chunks = None
        if self.role == "client" and self._status < 200:
            return  # interim response: the final one follows, no End (RFC 9110 §15.2)
        if self._trailers:
            limits = self.limits
            if self._count > limits.max_header_count or self._size > limits.max_header_bytes:
                raise _Reject(431, "trailer section over limits")
            if any(name in NOT_TRAILERS for name, _ in self._trailers):
                raise _Reject(400, "framing field in trailers")
            self._pending.append(Trailers(self._trailers))
        self._pending.append(END)
        self._message_done = True

    # -- parsing -------------------------------------------------------------

    def _fail(self, status: int, reason: str) -> None:
        self._dead = True
        self._parser = None
        self._pending.append(ProtocolError(status, reason))

    def _parse(self, data: Buffer) -> None:
        """Feed llhttp in pieces that end where a message may end, so every head starts a
        piece and its raw size is known: a head is held to ``max_header_bytes`` of bytes
        (start line through the empty line) whole or split, and llhttp sees no more of an
        oversized one than its first ``max_header_bytes``, so 400 or 431 does not depend
        on how the reads split it (the native scanner takes no head over that size). A
        chunked body's trailer section is held alike: ``ChunkLines`` follows the body and
        llhttp sees no more of an oversized section than its first ``max_header_bytes``."""
        if type(data) is not bytes:
            data = bytes(data)
        limit = self.limits.max_header_bytes
        while data:
            parser = self._parser
            if parser is None:
                return
            boundary = not self._in_message
            in_head = self._in_head
            start = 0
            over = False
            if boundary:
                if data[0] == 13 or data[0] == 10:  # llhttp skips empty lines
                    start = len(data) - len(data.lstrip(b"\r\n"))
                end = data.find(_HEAD_END, start)
                cut = end + 4 if end >= 0 else len(data)
                if cut - start > limit:
                    cut, over = start + limit, True
                self._wire_src = data
            else:
                end = -1
                if self._body_left > 0:
                    cut = min(self._body_left, len(data))
                else:
                    cut = _end_after(
                        self._tail if not in_head else self._tail[-self._head_fed :], data
                    )
                if in_head:
                    size = cut if cut >= 0 else len(data)
                    if self._head_fed + size > limit:
                        cut, over = limit - self._head_fed, True
                if cut < 0:
                    cut = len(data)
            piece, data = (data, b"") if cut >= len(data) else (data[:cut], data[cut:])
            chunks = self._chunks
            if chunks is not None and not boundary:
                # A trailer section over the limit: llhttp sees no more than its first bytes.
                past = chunks.feed(piece)
                if past >= 0:
                    piece, data, over = piece[:past], b"", True
            try:
                parser.feed_data(piece)
            except httptools.HttpParserUpgrade as exc:
                # RFC 9110 §7.8 / §9.3.6: the bytes after the head are not HTTP.
                self._raw = bytearray(piece[exc.args[0] :])
                self._raw += data
                self._parser = None
                return
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if not isinstance(cause, _Reject):
                    raise
                self._fail(cause.status, cause.reason)
                return
            except httptools.HttpParserError as exc:
                self._fail(400, str(exc))
                return
            self._wire_src = None
            self._tail = piece[-3:]
            if over and not self._in_head:
                self._fail(431, "trailer section over limits")
                return
            if self._in_head:
                if over:
                    self._fail(431, "header section over limits")
                    return
                if boundary:
                    self._head_fed = len(piece) - start
                elif in_head:
                    self._head_fed += len(piece)
                else:
                    # Begun inside a piece (cannot happen when pieces end where messages
                    # may): its bytes are at most those after the last empty line.
                    self._head_fed = len(piece) - (piece.rfind(_HEAD_END) + 4)
                    if self._head_fed > limit:
                        self._fail(431, "header section over limits")
                        return

    def _feed(self, data: Buffer) -> None:
        if self._dead:
            return
        if self._scanner is not None and (
            self._left >= 0
            or (
                not self._in_message
                and self._raw is None
                and not self._headbuf
                and self._scannable()
            )
        ):
            data = self._scan(data)
            if not data:
                return
        if self._raw is not None:
            self._raw += data
        elif (
            self.role == "client"
            and not self._final_seen
            and (self._method == NO_BODY_METHOD or self._method == b"CONNECT")
        ):
            self._feed_head_only(data)
        else:
            self._parse(data)

    def _scannable(self) -> bool:
        # Responses to HEAD and CONNECT are delimited by _feed_head_only; after a complete
        # response, llhttp's on_message_begin refuses another one.
        return self.role == "server" or (
            not self._message_done and self._method != NO_BODY_METHOD and self._method != b"CONNECT"
        )

    def _scan(self, data: Buffer) -> Buffer:
        """Take whole plain heads (native scanner) and their Content-Length bodies.

        Called at a message boundary or inside a scanned body; returns what llhttp
        must parse. Pipelined messages in one read are taken in one call, as llhttp would.
        """
        pending = self._pending
        server = self.role == "server"
        limits = self.limits
        assert self._scanner is not None
        while True:
            left = self._left
            if left > 0:
                size = len(data)
                if not size:
                    return b""
                if size < left:
                    pending.append(Body(data))
                    self._left = left - size
                    return b""
                pending.append(Body(data if size == left else data[:left]))
                data = data[left:]
            if left >= 0:
                pending.append(END)
                self._left = -1
                if not server:
                    self._message_done = True
                    return data  # llhttp skips empty lines, refuses a second response
                if not data:
                    return b""
            found = self._scanner(data, server, limits.max_header_bytes, limits.max_header_count)
            if found is None:
                return data
            size, first, second, version, headers, length, close, keep_alive, expect, wire = found
            persistent = not close and (version == b"1.1" or keep_alive)
            head: RequestHead | ResponseHead
            if server:
                head = RequestHead(
                    first, second, headers, version, persistent, length, False, expect, False, wire
                )
                self._left = length or 0
            else:
                if length is None and first not in NO_BODY_STATUSES:
                    return data  # delimited by close: llhttp's path
                head = ResponseHead(
                    first, second, headers, version, persistent, length, False, wire
                )
                self._status = first
                self._final_seen = True
                self._left = 0 if first in NO_BODY_STATUSES else length or 0
            pending.append(head)
            data = data[size:]

    def _feed_head_only(self, data: Buffer) -> None:
        # llhttp would read a body after a HEAD response or a 2xx to CONNECT,
        # so it gets exactly the head bytes (RFC 9112 §6.3 (1), (2)).
        buf = self._headbuf
        buf += data
        while not self._final_seen:
            end = buf.find(_HEAD_END)
            if end < 0:
                if len(buf) - len(buf.lstrip(b"\r\n")) + self.limits.max_header_bytes < len(buf):
                    self._parse(bytes(buf))  # refused as a whole one would be
                    buf.clear()
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._parse(head)
            if self._dead:
                return
        rest = bytes(buf)
        buf.clear()
        if self._method == NO_BODY_METHOD:
            if not self._message_done:
                self._in_message = False
                self._pending.append(END)
            self._parser = self._new_parser()
            if rest.lstrip(b"\r\n"):
                self._fail(400, _EARLY)
        elif 200 <= self._status < 300:
            self._raw = bytearray(rest)
            self._parser = None
        elif rest:
            self._parse(rest)

    def _feed_eof(self) -> None:
        if self._dead:
            return
        if self._headbuf:
            self._pending.append(Reset(0, "connection closed mid-head"))
        elif self._left > 0:
            self._pending.append(Reset(0, "connection closed mid-message"))
        elif self._in_message:
            if self._until_close and not self._in_head:
                # RFC 9112 §6.3 (8): close is how this body ends.
                self._in_message = False
                self._pending.append(END)
            else:
                self._pending.append(Reset(0, "connection closed mid-message"))

    def _holding(self) -> bool:
        return bool(self._raw) or bool(self._headbuf)

    def _take_trailing(self) -> bytes:
        raw = self._raw
        if raw is None:
            return b""
        self._raw = bytearray()
        return bytes(raw)

    def _next_cycle(self) -> None:
        self._status = 0
        self._final_seen = self._message_done = self._until_close = False
        raw = self._raw
        if raw is not None:
            # An Upgrade was declined: what followed the request is HTTP after all.
            self._raw = None
            self._parser = self._new_parser()
            if raw:
                self._parse(bytes(raw))

    # -- serialising ---------------------------------------------------------

    # A head carrying ``wire`` bytes (it arrived whole and is forwarded unchanged) is sent as
    # those bytes when the framing they state is the framing this side would choose anyway.

    # A head with wire bytes keeps its header list as received: serialised anew, it drops
    # the hop-by-hop fields its wire bytes never had.

    def _send_request(self, ev: RequestHead) -> Buffer:
        wire = ev.wire
        if wire is None:
            return super()._send_request(ev)
        if self.role != "client" or self._our is not IDLE:
            return super()._send_request(_without_wire(ev))
        self._method = ev.method
        self._upgrade = False
        length = ev.content_length
        if length:
            self._send_mode, self._send_left = LENGTH, length
        else:
            self._send_mode = NO_BODY  # RFC 9112 §6.3 (7)
        self._our = SEND_BODY
        return wire

    def _send_response(self, ev: ResponseHead) -> Buffer:
        wire = ev.wire
        their = self._their
        if (
            wire is None
            or self.role != "server"
            or self._our is not IDLE
            or (their is not SEND_BODY and their is not DONE)
            or not self._keep_alive
            or self._peer_version != b"1.1"
            or self._method == NO_BODY_METHOD
        ):
            return super()._send_response(ev if wire is None else _without_wire(ev))
        if ev.status in NO_BODY_STATUSES:  # a HEAD request took the general way above
            self._send_mode = NO_BODY
        elif ev.content_length is not None:
            self._send_mode, self._send_left = LENGTH, ev.content_length
        else:
            return super()._send_response(_without_wire(ev))
        self._our = SEND_BODY
        return wire

    def _encode_request(self, ev: RequestHead, mode: int) -> Buffer:
        return request_head_bytes(ev.method, ev.target, ev.headers)

    def _encode_response(self, ev: ResponseHead, mode: int, facts: HeadFacts | None) -> Buffer:
        line = status_line(ev.status, ev.reason)
        headers = ev.headers
        extra1 = extra2 = None
        if facts is not None:
            if mode is CHUNKED and not facts.chunked:
                extra1 = _TE_CHUNKED
            elif mode is UNTIL_CLOSE and facts.chunked:
                # RFC 9112 §6.1: no chunked to an HTTP/1.0 recipient.
                headers = [h for h in headers if h[0] != b"transfer-encoding"]
            if not self._keep_alive:
                if not facts.close:
                    extra2 = _CONN_CLOSE
            elif self._peer_version != b"1.1" and not facts.keep_alive:
                # RFC 9112 §9.3: a 1.0 peer only persists if we say so.
                extra2 = _CONN_KEEP_ALIVE
        return join_head([line], headers, extra1, extra2)

    def _encode_body(self, data: Buffer, mode: int) -> Buffer:
        if mode is CHUNKED:
            size = len(data)
            if not size:
                return b""  # an empty chunk would end the message (RFC 9112 §7.1)
            return b"".join((b"%x\r\n" % size, data, _CRLF))
        return data

    def _encode_end(self, mode: int, trailers: Headers | None) -> Buffer:
        if mode is not CHUNKED:
            return b""
        if not trailers:
            return _LAST_CHUNK
        return join_head([_LAST_CHUNK_OPEN], trailers, None, None)


def _end_after(tail: bytes, data: bytes) -> int:
    """Where in ``data`` the first CRLFCRLF of ``tail + data`` ends; -1 if none."""
    if tail:
        at = (tail + data[:3]).find(_HEAD_END)
        if at >= 0:
            return at + 4 - len(tail)
    at = data.find(_HEAD_END)
    return at + 4 if at >= 0 else -1


def request_head_bytes(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head as this codec writes it (framing is read from its fields)."""
    return join_head([method, b" ", target, _REQUEST_LINE_TAIL], headers, None, None)


def _without_wire(ev):
    return replace(ev, headers=strip_hop_by_hop(ev.headers), wire=None)


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``, prebuilt for the common codes."""
    cached = _STATUS_LINES.get(status)
    if cached is not None and (not reason or reason == cached[0]):
        return cached[1]
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def join_head(
    parts: list[Buffer],
    headers: Headers,
    extra1: tuple[bytes, bytes] | None,
    extra2: tuple[bytes, bytes] | None,
) -> bytes:
    """``parts`` (a start line) then each field and up to two extra ones as lines, then CRLF."""
    append = parts.append
    lines = 1
    for name, value in headers:
        append(name)
        append(_SEP)
        append(value)
        append(_CRLF)
    lines += len(headers)
    for extra in (extra1, extra2):
        if extra is not None:
            append(extra[0])
            append(_SEP)
            append(extra[1])
            append(_CRLF)
            lines += 1
    append(_CRLF)
    out = b"".join(parts)
    # A CR or LF smuggled inside a name, value or target would split the head
    # (response splitting); one count per byte class catches it without a
    # per-header check.
    if out.count(b"\n") != lines + 1 or out.count(b"\r") != lines + 1:
        raise CodecUsageError("CR or LF inside a header field or start line")
    return out
