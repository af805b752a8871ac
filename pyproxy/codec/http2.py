"""HTTP/2 helpers that stay sans-I/O: header translation to and from the HTTP/1 event vocabulary, and
a frame scanner that bounds header blocks and lifts GOAWAY out of the byte stream ahead of h2."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

from pyproxy.codec.events import Headers, ProtocolError, RequestHead, ResponseHead
from pyproxy.codec.http1 import FIELD_CONTROL, FIELD_NAME, strip_hop_by_hop
from pyproxy.protocol import (
    AUTHORITY_CHARS,
    H2_CONNECTION_SPECIFIC,
    H2_TE_ALLOWED,
    PATH_CHARS,
    has_body,
)

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
# request_from_h2's reason for a field name or value an HTTP/1 peer would not take.
FIELD_REFUSED: Final = "a field name that is not a token, or a control character in a value"
# §8.1.1: a request whose Content-Length differs from its DATA is malformed. One that ends with
# its head but promises a body would reach an HTTP/1 upstream as a head waiting for bytes that
# the next request on that connection would then supply.
BODY_PROMISED: Final = "content-length promises a body the stream does not carry"

# Frame types and flags the scanner looks at (RFC 9113 §6).
_HEADERS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0x1, 0x5, 0x7, 0x9
_END_HEADERS = 0x4
_FRAME_HEADER = 9

# Fields an HTTP/1 head carries that an HTTP/2 one does not: the connection-specific ones and
# Host, which becomes :authority (RFC 9113 §8.3.1). TE is handled apart: only "trailers" crosses.
_NOT_IN_H2: Final = H2_CONNECTION_SPECIFIC | {b"host"}
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}

# RFC 9110 §5.6.2 token characters (a method); a path's and an authority's: protocol.py.
_TCHAR: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_PATH_CHARS: Final = frozenset(PATH_CHARS)
_AUTHORITY_CHARS: Final = frozenset(AUTHORITY_CHARS)
_SCHEMES: Final = (b"http", b"https")


class HeaderBlockTooLarge(Exception):
    """A HEADERS/PUSH_PROMISE + CONTINUATION sequence passed the byte limit before it ended."""


class FrameScanner:
    """Walks frame boundaries (RFC 9113 §4.1) of one inbound HTTP/2 byte stream before h2 sees it.

    Two jobs h2 does not do the way a proxy needs:

    * bound a header block across HEADERS + CONTINUATION by bytes (2024 CONTINUATION
      flood): h2 buffers up to 64 frames of max_frame_size before it complains, and its
      header-list limit applies only after the whole block arrived;
    * take GOAWAY frames out of the stream and report them: h2 moves its connection state
      to CLOSED on any GOAWAY, so in-flight streams could no longer finish (§6.8 says they
      may).

    Everything else passes through untouched; when nothing is cut the caller gets its own
    buffer back. A frame header split across reads is held back until complete.
    """

    __slots__ = ("limit", "scan", "_preface_left", "_carry", "_left", "_goaway", "_block")

    def __init__(self, limit: int, server: bool, scan: Any = None) -> None:
        self.limit = limit
        # The native codec's pp_h2_scan: the same walk in C over a read that needs nothing cut.
        self.scan = scan if limit <= 0xFFFFFFFF else None
        self._preface_left = len(PREFACE) if server else 0
        self._carry = b""
        self._left = 0  # payload bytes of the current frame still to come
        self._goaway: bytearray | None = None  # payload of a GOAWAY being lifted out
        self._block = 0  # bytes of the header block in progress (frame headers included)

    def passes(self, data: bytes) -> bool:
        """Does the read go to the codec as it is (walked in C: no GOAWAY, no frame header split,
        no block past the limit)? True: the walk's state has moved past it; False: nothing moved,
        ``feed`` walks it."""
        scan = self.scan
        if (
            scan is not None
            and type(data) is bytes
            and not self._carry
            and not self._preface_left
            and self._goaway is None
        ):
            state = scan(data, len(data), self.limit, self._left, self._block)
            if state >= 0:
                self._left = state & 0xFFFFFF
                self._block = state >> 24
                return True
        return False

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """Return (bytes for h2, GOAWAY payloads); raise HeaderBlockTooLarge past the limit."""
        if self.passes(data):
            return data, []
        if self._carry:
            data = self._carry + data
            self._carry = b""
        n = len(data)
        pos = 0
        if self._preface_left:
            step = min(self._preface_left, n)
            self._preface_left -= step
            pos = step
        parts: list[bytes] | None = None
        goaways: list[bytes] = []
        keep_from = 0  # start of the bytes not yet cut or copied into parts
        end = n
        while pos < n:
            left = self._left
            if left:
                step = left if left < n - pos else n - pos
                if self._goaway is not None:
                    self._goaway += data[pos : pos + step]
                pos += step
                self._left = left - step
                if not self._left and self._goaway is not None:
                    goaways.append(bytes(self._goaway))
                    self._goaway = None
                    keep_from = pos
                continue
            if n - pos < _FRAME_HEADER:
                self._carry = bytes(data[pos:])
                end = pos
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            kind = data[pos + 3]
            if kind == _GOAWAY:
                if parts is None:
                    parts = []
                parts.append(data[keep_from:pos])
                self._goaway = bytearray()
                pos += _FRAME_HEADER
                keep_from = pos
                self._left = length
                if not length:
                    goaways.append(b"")
                    self._goaway = None
                continue
            if kind == _HEADERS or kind == _PUSH_PROMISE or kind == _CONTINUATION:
                block = (self._block if kind == _CONTINUATION else 0) + length + _FRAME_HEADER
                if block > self.limit:
                    raise HeaderBlockTooLarge(block)
                self._block = 0 if data[pos + 4] & _END_HEADERS else block
            pos += _FRAME_HEADER
            self._left = length
        if self._goaway is not None:
            keep_from = n  # the GOAWAY continues in the next read: cut what we have of it
        if parts is None and keep_from == 0 and end == n:
            return data, goaways
        if parts is None:
            parts = []
        if keep_from < end:
            parts.append(data[keep_from:end])
        return b"".join(parts), goaways


def parse_goaway(payload: bytes) -> tuple[int, int]:
    """(last_stream_id, error_code) of a GOAWAY payload (RFC 9113 §6.8)."""
    if len(payload) < 8:
        return 0, 0x1  # malformed: treat as PROTOCOL_ERROR with nothing processed
    return int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big")


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame built by hand, so h2's connection state stays open for in-flight streams."""
    payload = (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big") + error_code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + bytes((_GOAWAY, 0)) + b"\0\0\0\0" + payload


# ---- translation ---------------------------------------------------------------------


def header_list_size(headers: Headers) -> int:
    """Measured like the HTTP/1 limit (name + value + 4 per field) so one setting means one size."""
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def request_from_h2(
    headers: Headers, ended: bool, fields_checked: bool = False
) -> RequestHead | ProtocolError:
    """An HTTP/2 request header list as the RequestHead an HTTP/1 peer expects, or why not.

    h2 has checked the field names and values (§8.2) and which pseudo-headers are present
    (§8.3); what goes into the HTTP/1 request line is checked here, and so are what h2 lets by
    but an HTTP/1 peer would not take (a field name that is not a token, a control character
    in a value, §8.2.1). The ProtocolError's status is 501 for what this proxy does not relay
    (CONNECT, §8.5), else 400: a malformed request, a stream error of type PROTOCOL_ERROR
    (§8.1.1). ``fields_checked``: the codec already knows every name is a token and no value
    holds a control character.
    """
    method = path = authority = host = scheme = None
    content_length = None
    trailers_announced = False
    cookies: list[bytes] = []
    fields: Headers = []
    if not fields_checked and _field_refused(headers):
        return ProtocolError(400, FIELD_REFUSED)
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            host = value
        else:
            if name == b"trailer":
                trailers_announced = True
            if name == b"content-length":
                if not value.isdigit():
                    return ProtocolError(400, "invalid content-length")
                content_length = int(value)
            fields.append((name, value))
    if method == b"CONNECT":
        return ProtocolError(501, "CONNECT is not relayed")
    problem = _pseudo_header_problem(method, path, scheme, authority)
    if problem:
        return ProtocolError(400, problem)
    if ended and content_length:
        return ProtocolError(400, BODY_PROMISED)
    assert method is not None and path is not None
    # §8.2.3: cookie crumbs are joined back for an HTTP/1.1 hop.
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    fields.insert(0, (b"host", authority if authority is not None else (host or b"")))
    return RequestHead(
        method,
        path,
        fields,
        b"2",
        keep_alive=True,
        content_length=content_length,
        # A body of unknown length, or one with trailers to follow (RFC 9110 §6.6.2 Trailer):
        # an HTTP/1.1 upstream needs chunked framing for it (its Content-Length stays for HTTP/2).
        chunked=not ended and (content_length is None or trailers_announced),
    )


def _pseudo_header_problem(
    method: bytes | None, path: bytes | None, scheme: bytes | None, authority: bytes | None
) -> str:
    """What is wrong with a request's pseudo-headers (RFC 9113 §8.3.1), or ""."""
    if not method or not _TCHAR.issuperset(method):
        return ":method is not a token"
    if scheme not in _SCHEMES:
        return ":scheme is not http or https"
    if not path:
        return ":path is missing or empty"
    if path == b"*":
        if method != b"OPTIONS":
            return ":path * is for OPTIONS only"
    elif path[:1] != b"/" or not _PATH_CHARS.issuperset(path):
        return ":path is not an origin-form path"
    if authority is not None and not _AUTHORITY_CHARS.issuperset(authority):
        return ":authority is not host[:port]"
    return ""


def h2_request_headers(head: RequestHead, te_trailers: bool) -> tuple[Headers, bool]:
    """(header list, has body) for an HTTP/2 upstream; framing is read from the head's fields."""
    authority = None
    carries_body = False
    fields: Headers = []
    for name, value in head.headers:
        if name in _NOT_IN_H2:
            if name == b"host":
                authority = value
            elif name == b"transfer-encoding":
                carries_body = True
            continue
        if name == b"content-length":
            carries_body = value.strip() not in (b"0", b"")
        fields.append((name, value))
    pseudo: Headers = [(b":method", head.method), (b":scheme", b"http")]
    if authority:
        pseudo.append((b":authority", authority))
    pseudo.append((b":path", head.target))
    if te_trailers:
        fields.append((b"te", H2_TE_ALLOWED))
    return pseudo + fields, carries_body


def _field_refused(headers: Headers) -> bool:
    """A field name that is not a token, or a control character in a value (§8.2.1)."""
    for name, value in headers:
        if FIELD_CONTROL.search(value) or (name[:1] != b":" and not FIELD_NAME.fullmatch(name)):
            return True
    return False


def response_from_h2(headers: Headers, fields_checked: bool = False) -> ResponseHead | None:
    """None for a malformed response h2 lets through (RFC 9113 §8.1.1): a :status that is
    not three digits (RFC 9110 §15), a Content-Length that is not digits, a field name
    that is not a token, a control character in a field value (``fields_checked``: the
    codec already knows there is none of those two)."""
    status = 0
    content_length = None
    fields: Headers = []
    if not fields_checked and _field_refused(headers):
        return None
    for name, value in headers:
        if name == b":status":
            if len(value) != 3 or not value.isdigit():
                return None
            status = int(value)
        elif name[:1] != b":":
            if name == b"content-length":
                if not value.isdigit():
                    return None
                content_length = int(value)
            fields.append((name, value))
    return ResponseHead(
        status, _REASONS.get(status, b""), fields, b"2", content_length=content_length
    )


def h2_response_headers(head: ResponseHead) -> Headers:
    fields: Headers = [(b":status", b"%d" % head.status)]
    fields.extend(item for item in head.headers if item[0] not in _NOT_IN_H2)
    return fields


def h2_relayed_response_headers(head: ResponseHead) -> Headers:
    """An HTTP/1 response head as received, for an HTTP/2 downstream: the fields its Connection
    header names go too (RFC 9110 §7.6.1), with the ones HTTP/2 never carries."""
    headers = head.headers
    for name, _ in headers:
        if name == b"connection":
            headers = strip_hop_by_hop(headers)
            break
    fields: Headers = [(b":status", b"%d" % head.status)]
    fields.extend(item for item in headers if item[0] not in _NOT_IN_H2)
    return fields


def h2_trailers(headers: Headers) -> Headers:
    return [item for item in headers if item[0] not in _NOT_IN_H2 and item[0][:1] != b":"]


def wants_trailers(headers: Headers) -> bool:
    """Did the client say it accepts trailers (TE: trailers, RFC 9110 §10.1.4)?"""
    for name, value in headers:
        if name == b"te" and b"trailers" in value.lower():
            return True
    return False


def response_has_body(method: bytes, head: ResponseHead) -> bool:
    # Nor does a response that says its length is zero.
    if not has_body(head.status, method):
        return False
    for name, value in head.headers:
        if name == b"content-length" and value.strip() == b"0":
            return False
    return True
