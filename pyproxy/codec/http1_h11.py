"""The reference HTTP/1 backend: h11 parses and serialises, held to the proxy's stricter rules.

h11 is lenient where a proxy must not be, so before h11 sees a head this
wrapper checks the raw bytes: bare-LF line ends and obs-fold are refused
(RFC 9112 §2.2, §5.2; h11 accepts and unfolds them), and the framing fields
are checked in wire order by the same ``HeadFacts`` the fast backend uses
(h11 silently collapses duplicate Content-Length and lets
Transfer-Encoding win over Content-Length). h11 also never keeps an
HTTP/1.0 connection alive; RFC 9112 §9.3 allows it, so a fresh h11
connection takes over the buffered bytes for the next cycle, and the
``Connection: close`` h11 writes to a 1.0 keep-alive peer is rewritten.
Trailers are surfaced (h11's EndOfMessage carries them). A chunked body's
lines are held to llhttp's grammar beside h11 (chunk_lines.py).
"""

from __future__ import annotations

import re
from typing import Final

import h11

from pyproxy.codec.chunk_lines import ChunkLines
from pyproxy.codec.events import (
    END,
    Body,
    Buffer,
    Event,
    Headers,
    ProtocolError,
    RequestHead,
    Reset,
    ResponseHead,
    Trailers,
)
from pyproxy.codec.http1 import (
    _FACT_NAMES,
    DEFAULT_LIMITS,
    FIELD_CONTROL,
    NOT_TRAILERS,
    CodecUsageError,
    HeadFacts,
    Http1Codec,
    Http1Limits,
    Role,
    head_size,
)
from pyproxy.protocol import has_body

_CTL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# h11 takes any HTTP/<digit>.<digit>; the fast backend's llhttp only these. Which of them
# the proxy serves is decided for both backends in HeadFacts.
_LLHTTP_VERSIONS: Final = frozenset({b"0.9", b"1.0", b"1.1", b"2.0"})
# RFC 9112 §3.2: origin-form, asterisk-form or absolute-form (llhttp's test: a scheme then
# "://"); h11 takes any visible characters.
_TARGET_FORM: Final = re.compile(rb"[/*]|[A-Za-z][A-Za-z0-9+.\-]*://")
_CLOSE_LINE: Final = b"\r\nConnection: close\r\n"
_KEEP_ALIVE_LINE: Final = b"\r\nConnection: keep-alive\r\n"


class H11Http1Codec(Http1Codec):
    """Http1Codec on h11 (strict, pure Python: the reference the fast backend is tested against)."""

    __slots__ = ("_conn", "_dead", "_raw", "_facts", "_chunks", "_content_out")

    def __init__(self, role: Role, limits: Http1Limits = DEFAULT_LIMITS) -> None:
        super().__init__(role, limits)
        self._conn = self._new_conn()
        self._dead = False
        self._raw: bytearray | None = None
        # Facts of the head h11 is about to parse; None until the raw check passed.
        self._facts: HeadFacts | None = None
        # The chunked body being received, vetted beside h11, and the content passed on.
        self._chunks: ChunkLines | None = None
        self._content_out = 0

    def _new_conn(self) -> h11.Connection:
        return h11.Connection(
            h11.SERVER if self.role == "server" else h11.CLIENT,
            max_incomplete_event_size=self.limits.max_header_bytes,
        )

    # -- parsing -------------------------------------------------------------

    def _fail(self, status: int, reason: str) -> None:
        self._dead = True
        self._pending.append(ProtocolError(status, reason))

    def _waiting_for_head(self) -> bool:
        state = self._conn.their_state
        return state is (h11.IDLE if self.role == "server" else h11.SEND_RESPONSE)

    def _check_raw_head(self) -> bool:
        """Vet the buffered head before h11 parses it; False means wait or failed."""
        buf = self._conn.trailing_data[0]
        end = buf.find(b"\r\n\r\n")
        limit = self.limits.max_header_bytes
        # Over the limit, only the head's first ``limit`` bytes are looked at, whether it
        # is whole or not: the verdict (400 or 431) does not depend on how reads split it.
        over = (end + 4 if end >= 0 else len(buf)) > limit
        if over:
            head = buf[:limit]
        else:
            head = buf if end < 0 else buf[: end + 2]
        if end < 0 or over:
            # An unfinished head may end in the CR of a CRLF still on its way.
            head = head[:-1] if head.endswith(b"\r") else head
        # RFC 9112 §2.2: we accept CRLF only (llhttp's rule), never a bare LF or CR;
        # RFC 9110 §5.5: no other control characters in field values (h11 lets them by).
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf or head.count(b"\r") != crlf or _CTL.search(head):
            self._fail(400, "bare CR/LF or control character in head")
            return False
        if over:
            self._fail(431, "header section over limits")
            return False
        if end < 0:
            return False
        # RFC 9112 §5.2: obs-fold is rejected with 400, not unfolded.
        if b"\r\n " in head or b"\r\n\t" in head:
            self._fail(400, "obs-fold in head")
            return False
        lines = head.split(b"\r\n")[1:-1]
        if len(lines) > self.limits.max_header_count:
            self._fail(431, "header section over limits")
            return False
        facts = HeadFacts()
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in _FACT_NAMES:
                err = facts.add(name, value.strip(b" \t"))
                if err is not None:
                    self._fail(err.status, err.reason)
                    return False
        self._facts = facts
        return True

    def _pump(self) -> None:
        conn = self._conn
        if self.role == "client" and conn.our_state is h11.IDLE:
            return  # h11 would take bytes as the response to a request not sent yet
        pending = self._pending
        while not self._dead and self._raw is None:
            if conn.their_state is h11.MUST_CLOSE:
                # The cycle is over; h11 would call what follows an error, the fast backend
                # holds it for start_next_cycle (HTTP/1.0 keep-alive) or drops it with the
                # connection. Both backends hold it.
                return
            if (
                self.role == "client"
                and conn.their_state is h11.DONE
                and conn.trailing_data[0].lstrip(b"\r\n")
            ):
                self._fail(400, "response bytes before a request")  # we never pipeline
                return
            if self._facts is None and self._waiting_for_head() and conn.trailing_data[0]:
                if not self._check_raw_head():
                    return
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                chunks = self._chunks
                if self._eof:
                    self._dead = True
                    pending.append(Reset(0, "connection closed mid-message"))
                elif chunks is not None and chunks.error is not None:
                    # The raw lines' verdict: h11's own limit counts what it buffered.
                    self._fail(chunks.status, chunks.error)
                else:
                    self._fail(exc.error_status_hint, str(exc))
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED or type(ev) is h11.ConnectionClosed:
                # ConnectionClosed repeats forever once the peer is gone: stop pumping.
                # h11 gave all it could: a framing fault it let by is due now.
                if self._chunks is not None and self._chunks.error is not None:
                    self._fail(self._chunks.status, self._chunks.error)
                return
            if self._chunks is not None and self._chunks.error is not None:
                if not self._content_upto_fault(ev):
                    return
            out = self._convert(ev)
            pending.append(out)
            if isinstance(out, ProtocolError):
                self._dead = True
                return
            if isinstance(out, Body):
                self._content_out += len(out.data)
            elif isinstance(out, (RequestHead, ResponseHead)):
                self._vet_chunks(out)
            if conn.their_state is h11.SWITCHED_PROTOCOL:
                self._raw = bytearray(conn.trailing_data[0])

    def _vet_chunks(self, head: RequestHead | ResponseHead) -> None:
        """Start following a chunked body with the bytes h11 holds after its head."""
        self._chunks = None
        if not head.chunked:
            return
        if type(head) is ResponseHead and not has_body(head.status, self._method):
            return
        self._chunks = ChunkLines(self.limits.max_header_bytes)
        self._content_out = 0
        self._chunks.feed(bytes(self._conn.trailing_data[0]))

    def _content_upto_fault(self, ev: object) -> bool:
        """Pass on h11's content short of the framing fault, then fail; True: ``ev`` goes on."""
        assert self._chunks is not None and self._chunks.error is not None
        room = self._chunks.content_before_error - self._content_out
        if type(ev) is h11.Data and room > 0:
            data = ev.data  # type: ignore[attr-defined]
            if len(data) <= room:
                return True
            self._pending.append(Body(data[:room]))
            self._content_out += room
        self._fail(self._chunks.status, self._chunks.error)
        return False

    def _convert(self, ev: object) -> Event:
        kind = type(ev)
        if kind is h11.Data:
            return Body(ev.data)  # type: ignore[attr-defined]
        if kind is h11.EndOfMessage:
            trailers = ev.headers  # type: ignore[attr-defined]
            limits = self.limits
            # Decided at the section's end, before what is in it (as for a head).
            if len(trailers) > limits.max_header_count or (
                head_size(0, trailers) > limits.max_header_bytes
            ):
                return ProtocolError(431, "trailer section over limits")
            if any(n in NOT_TRAILERS or FIELD_CONTROL.search(v) for n, v in trailers):
                # The raw check above vets heads only; llhttp refuses these in trailers too.
                return ProtocolError(400, "framing field or control character in trailers")
            if trailers:
                self._pending.append(Trailers(list(trailers)))
            return END
        facts = self._facts or HeadFacts()
        self._facts = None
        if ev.http_version not in _LLHTTP_VERSIONS:  # type: ignore[attr-defined]
            return ProtocolError(400, "unsupported HTTP version")
        headers: Headers = list(ev.headers)  # type: ignore[attr-defined]
        if kind is h11.Request:
            target = ev.target  # type: ignore[attr-defined]
            if not _TARGET_FORM.match(target) and ev.method != b"CONNECT":  # type: ignore[attr-defined]
                return ProtocolError(400, "request-target in no known form")
            if head_size(len(target), headers) > self.limits.max_header_bytes:
                return ProtocolError(431, "header section over limits")
            return facts.request_head(
                ev.method,  # type: ignore[attr-defined]
                target,
                headers,
                ev.http_version,  # type: ignore[attr-defined]
            )
        # Response or InformationalResponse
        if head_size(0, headers) > self.limits.max_header_bytes:
            return ProtocolError(431, "header section over limits")
        return facts.response_head(
            ev.status_code,  # type: ignore[attr-defined]
            ev.reason,  # type: ignore[attr-defined]
            headers,
            ev.http_version,  # type: ignore[attr-defined]
            self._method,
        )

    def _feed(self, data: Buffer) -> None:
        if self._dead:
            return
        if self._raw is not None:
            self._raw += data
            return
        data = bytes(data)
        if self._facts is None and self._waiting_for_head() and not self._conn.trailing_data[0]:
            data = _skip_empty_lines(data)
            if not data:
                return  # b"" would tell h11 the peer closed
        chunks = self._chunks
        if chunks is not None and not chunks.done and chunks.error is None:
            chunks.feed(data)
        self._conn.receive_data(data)
        self._pump()

    def _feed_eof(self) -> None:
        if self._dead or self._raw is not None:
            return
        if self._facts is None and self._waiting_for_head() and self._conn.trailing_data[0]:
            # A partial head the raw check was still waiting on.
            self._dead = True
            self._pending.append(Reset(0, "connection closed mid-head"))
            return
        self._conn.receive_data(b"")
        self._pump()

    def _holding(self) -> bool:
        return bool(self._raw) or bool(self._conn.trailing_data[0])

    def _take_trailing(self) -> bytes:
        raw = self._raw
        if raw is None:
            return b""
        self._raw = bytearray()
        return bytes(raw)

    def _next_cycle(self) -> None:
        # A fresh h11 connection takes the unparsed bytes: h11 refuses HTTP/1.0 keep-alive
        # (MUST_CLOSE), and its own start_next_cycle would keep a latched error that
        # crashes the next send; what was wrong is already queued in _pending.
        rest = _skip_empty_lines(self._conn.trailing_data[0])
        self._conn = self._new_conn()
        self._chunks = None
        if rest:
            self._conn.receive_data(rest)
        self._facts = None
        self._pump()

    # -- serialising ---------------------------------------------------------

    def _h11_send(self, make: type, **fields: object) -> bytes:
        # h11 validates while building the event, so both steps are guarded.
        try:
            out = self._conn.send(make(**fields))
        except h11.LocalProtocolError as exc:
            raise CodecUsageError(str(exc)) from exc
        return out or b""

    def _encode_request(self, ev: RequestHead, mode: int) -> Buffer:
        out = self._h11_send(h11.Request, method=ev.method, target=ev.target, headers=ev.headers)
        if self._conn.trailing_data[0]:
            self._pump()  # response bytes that came before the request was sent
        return out

    def _encode_response(self, ev: ResponseHead, mode: int, facts: HeadFacts | None) -> Buffer:
        if ev.status < 200:
            out = self._h11_send(
                h11.InformationalResponse,
                status_code=ev.status,
                headers=ev.headers,
                reason=ev.reason,
            )
        else:
            headers = ev.headers
            if not self._keep_alive and facts is not None and not facts.close:
                # h11 does not know our wrapper refused the request; say close.
                headers = [*headers, (b"connection", b"close")]
            out = self._h11_send(
                h11.Response, status_code=ev.status, headers=headers, reason=ev.reason
            )
            if self._keep_alive and self._peer_version != b"1.1":
                # RFC 9112 §9.3: tell the 1.0 peer the connection persists.
                out = out.replace(_CLOSE_LINE, _KEEP_ALIVE_LINE, 1)
        if self._conn.their_state is h11.SWITCHED_PROTOCOL:
            self._raw = bytearray(self._conn.trailing_data[0])
        return out

    def _encode_body(self, data: Buffer, mode: int) -> Buffer:
        return self._h11_send(h11.Data, data=data)

    def _encode_end(self, mode: int, trailers: Headers | None) -> Buffer:
        return self._h11_send(h11.EndOfMessage, headers=trailers or [])


def _skip_empty_lines(data: bytes) -> bytes:
    """Drop CR and LF bytes before a start line, as llhttp does (RFC 9112 §2.2 asks to
    ignore at least one empty line there): both backends must accept the same messages."""
    if data and (data[0] == 13 or data[0] == 10):
        return data.lstrip(b"\r\n")
    return data
