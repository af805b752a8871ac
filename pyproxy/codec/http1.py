"""The HTTP/1.1 codec interface, the connection-cycle rules all backends share, and the factory."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from pyproxy.codec.events import (
    END,
    PAUSED,
    Body,
    Buffer,
    End,
    Event,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Trailers,
)
from pyproxy.protocol import HOP_BY_HOP, has_body

Role = Literal["server", "client"]

# Connection states, modelled on h11's (one per side of the connection).
# Compared with ``is``; strings so they print well in logs and tests.
IDLE: Final = "IDLE"
SEND_BODY: Final = "SEND_BODY"
DONE: Final = "DONE"
MUST_CLOSE: Final = "MUST_CLOSE"
CLOSED: Final = "CLOSED"
MIGHT_SWITCH_PROTOCOL: Final = "MIGHT_SWITCH_PROTOCOL"
SWITCHED_PROTOCOL: Final = "SWITCHED_PROTOCOL"
ERROR: Final = "ERROR"

_CYCLE_OVER = frozenset({DONE, MUST_CLOSE, MIGHT_SWITCH_PROTOCOL, SWITCHED_PROTOCOL})


class CodecUsageError(RuntimeError):
    """The proxy drove the codec wrongly (a bug on our side, never the peer's fault)."""


@dataclass(frozen=True, slots=True)
class Http1Limits:
    """Bounds on what a peer may make us buffer; exceeding them answers 431 (RFC 6585 §5)."""

    # A head's bytes as received (start line through the empty line) and its measured
    # size (target, then name + value + 4 per field) must both stay within it; measured
    # the same way by every backend, whole or split across reads.
    max_header_bytes: int = 60 * 1024
    max_header_count: int = 100


DEFAULT_LIMITS: Final = Http1Limits()


# --- header helpers ---------------------------------------------------------

# RFC 9110 §5.5 / RFC 9112 §4: no control character but HTAB in a field value or a reason
# phrase (CR and LF included: no line may be split).
FIELD_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110 §6.5.1: fields that frame a message are never trailers (llhttp refuses a second
# Transfer-Encoding there); both backends refuse them.
NOT_TRAILERS: Final = frozenset({b"content-length", b"transfer-encoding"})
# RFC 9110 §5.1, §5.6.2: a field name is a token (lower-cased here).
FIELD_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")

# Connection options that name no extra field to drop ("close" names none at all).
_ALREADY_DROPPED: Final = HOP_BY_HOP | {b"close"}

# Fields a request cannot name in Connection: dropping them as hop-by-hop would re-frame the
# message (its body cut off or read differently) or take its Host away (RFC 9112 §6.3, §3.2).
_FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})

# RFC 9112 §3.2: origin-form starts with "/"; absolute-form with a scheme; "*" is OPTIONS only.
_ABSOLUTE_FORM: Final = (b"http://", b"https://")


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-cased options of one Connection field value (RFC 9110 §7.6.1)."""
    if b"," not in value:  # the usual single option ("keep-alive", "close")
        token = value.strip(b" \t").lower()
        return [token] if token else []
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


def _connection_named(headers: Headers) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(t for t in connection_tokens(value) if t not in _ALREADY_DROPPED)
    return named


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Return a copy of ``headers`` without hop-by-hop fields (RFC 9110 §7.6.1).

    Besides the fixed list, every field named in a Connection header is
    connection-specific and removed too.
    """
    kept = []
    named = None
    for field in headers:
        name = field[0]
        if name in HOP_BY_HOP:
            if name == b"connection":
                options = connection_tokens(field[1])
                extra = [option for option in options if option not in _ALREADY_DROPPED]
                if extra:
                    named = (named or set()).union(extra)
            continue
        kept.append(field)
    if named:
        kept = [field for field in kept if field[0] not in named]
    return kept


def strip_hop_by_hop_lines(head: bytes, headers: Headers) -> bytes:
    """The same for a head as received: ``head`` holds the start line and one line per
    entry of ``headers`` (a parser accepted it, so no folding), ending in CRLFCRLF."""
    named = _connection_named(headers)
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]]
    for line, (name, _) in zip(lines[1:], headers, strict=True):
        if name not in HOP_BY_HOP and name not in named:
            kept.append(line)
    kept.append(b"\r\n")
    return b"\r\n".join(kept)


def head_size(start: int, headers: Headers) -> int:
    """The size the limits measure: start-line bytes plus each header as ``name: value\\r\\n``."""
    size = start
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


class HeadFacts:
    """Collects, header by header, the facts framing and persistence depend on.

    Both backends feed it the fields in wire order, so they reject the same
    messages with the same status. ``add`` returns a ProtocolError or None.
    An unsupported Transfer-Encoding is answered (501) only once the head is
    complete: a malformed line anywhere in it is a 400 first, whichever read
    it came in (llhttp reports a field only when the next one starts).
    """

    __slots__ = (
        "content_length",
        "chunked",
        "hosts",
        "close",
        "keep_alive",
        "expect",
        "upgrade_field",
        "upgrade_token",
        "names_framing",
        "unsupported_coding",
    )

    def __init__(self) -> None:
        self.content_length: int | None = None
        self.chunked = False
        self.hosts = 0
        self.close = False
        self.keep_alive = False
        self.expect = False
        self.upgrade_field = False
        self.upgrade_token = False
        self.names_framing = False
        self.unsupported_coding = False

    def add(self, name: bytes, value: bytes) -> ProtocolError | None:
        if name == b"content-length":
            # RFC 9112 §6.3 (3): CL with TE is a smuggling vector; reject, don't pick one.
            if self.chunked:
                return ProtocolError(400, "Content-Length with Transfer-Encoding")
            # RFC 9112 §6.3 (5) allows collapsing identical duplicates; llhttp
            # refuses any duplicate, so every backend does (strictest common rule).
            if self.content_length is not None:
                return ProtocolError(400, "duplicate Content-Length")
            value = value.strip(b" \t")
            # RFC 9110 §8.6: Content-Length = 1*DIGIT; the cap keeps it an int64.
            if not value.isdigit() or len(value) > 18:
                return ProtocolError(400, "invalid Content-Length")
            self.content_length = int(value)
        elif name == b"transfer-encoding":
            if self.content_length is not None:
                return ProtocolError(400, "Content-Length with Transfer-Encoding")
            if self.chunked:
                return ProtocolError(400, "repeated Transfer-Encoding")
            # RFC 9112 §6.1: we only decode chunked; any other coding is 501 (at the head's end).
            if value.strip(b" \t").lower() != b"chunked":
                self.unsupported_coding = True
            else:
                self.chunked = True
        elif name == b"host":
            self.hosts += 1
        elif name == b"connection":
            for token in connection_tokens(value):
                if token == b"close":
                    self.close = True
                elif token == b"keep-alive":
                    self.keep_alive = True
                elif token == b"upgrade":
                    self.upgrade_token = True
                elif token in _FRAMING_FIELDS:
                    self.names_framing = True
        elif name == b"expect":
            self.expect = value.strip(b" \t").lower() == b"100-continue"
        elif name == b"upgrade":
            self.upgrade_field = True
        return None

    def persistent(self, http_version: bytes) -> bool:
        """RFC 9112 §9.3: 1.1 persists unless ``close``; 1.0 only with ``keep-alive``."""
        if self.close:
            return False
        return http_version == b"1.1" or self.keep_alive

    def request_head(
        self, method: bytes, target: bytes, headers: Headers, version: bytes
    ) -> RequestHead | ProtocolError:
        """Build the RequestHead, or the ProtocolError the finished head deserves."""
        if version != b"1.1" and version != b"1.0":
            return _version_error(version)
        if not _target_form_ok(method, target):
            return ProtocolError(
                400, "request target is not origin-form, absolute-form or OPTIONS *"
            )
        # RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request, else 400.
        if self.hosts > 1 or (self.hosts == 0 and version == b"1.1"):
            return ProtocolError(400, "missing or repeated Host")
        if self.names_framing:
            return ProtocolError(
                400, "Connection names a framing field (Content-Length, Transfer-Encoding or Host)"
            )
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
        if self.chunked and version == b"1.0":
            return ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        # RFC 9110 §7.8: an Upgrade offer counts only if Connection names it.
        upgrade = method == b"CONNECT" or (self.upgrade_field and self.upgrade_token)
        if upgrade and (self.content_length or self.chunked):
            # llhttp switches right after the head, h11 after the content: the content
            # of a declined upgrade would be parsed as the next request (a smuggling
            # vector), so neither backend takes one.
            return ProtocolError(400, "Upgrade or CONNECT request with content")
        if self.unsupported_coding:
            return _UNSUPPORTED_CODING
        return RequestHead(
            method,
            target,
            headers,
            version,
            self.persistent(version),
            self.content_length,
            self.chunked,
            self.expect,
            upgrade,
        )

    def response_head(
        self, status: int, reason: bytes, headers: Headers, version: bytes, method: bytes
    ) -> ResponseHead | ProtocolError:
        if self.unsupported_coding:
            return _UNSUPPORTED_CODING
        # RFC 9112 §4: three digits (llhttp takes "99"); RFC 9110 §15.2: 1xx is HTTP/1.1's
        # and (§8.6) carries no framing: llhttp would read a body after a "199".
        if status < 100 or (
            status < 200 and (version != b"1.1" or self.content_length is not None or self.chunked)
        ):
            return ProtocolError(400, "malformed status line")
        # RFC 9112 §6.3 (8): a final response with content but no length runs to close.
        until_close = (
            has_body(status, method)
            and self.content_length is None
            and not self.chunked
            and not (method == b"CONNECT" and status < 300)
        )
        return ResponseHead(
            status,
            reason,
            headers,
            version,
            not until_close and self.persistent(version),
            self.content_length,
            self.chunked,
        )


_UNSUPPORTED_CODING = ProtocolError(501, "unsupported Transfer-Encoding")


def _version_error(version: bytes) -> ProtocolError:
    # RFC 9112 §2.3 / Appendix C.1: an HTTP/0.9 request line has no version at all, so it is a
    # malformed 1.x request line (400); a version this hop cannot speak is 505 (RFC 9110 §15.6.6).
    if version == b"0.9":
        return ProtocolError(400, "HTTP/0.9 request line")
    return ProtocolError(505, "HTTP version not supported on HTTP/1: " + version.decode("latin-1"))


def _target_form_ok(method: bytes, target: bytes) -> bool:
    if target[:1] == b"/":
        return True
    if target == b"*":
        return method == b"OPTIONS"
    if method == b"CONNECT":
        return True  # authority-form (RFC 9112 §3.2.3); the proxy refuses CONNECT itself
    return target.lower().startswith(_ABSOLUTE_FORM)


def reject_reason(error: ProtocolError) -> str:
    """The counters' reason (pyproxy.counters.REJECTS) for a refused request; both backends'
    messages are classified here, once, off the hot path."""
    if error.status == 431:
        return "too_large"
    if error.status == 505:
        return "version"
    text = error.reason.lower()
    if "connect" in text and "connection" not in text:
        return "method"
    if any(word in text for word in _FIELD_WORDS):
        return "header"
    if any(word in text for word in _FRAMING_WORDS):
        return "framing"
    if any(word in text for word in _REQUEST_LINE_WORDS):
        return "request_line"
    return "header"


_FIELD_WORDS: Final = ("header line", "header field", "header value", "field name", "field value")
_FRAMING_WORDS: Final = ("content-length", "transfer-encoding", "chunk", "framing")
_REQUEST_LINE_WORDS: Final = ("method", "url", "target", "request line", "http/", "version")


# --- the codec interface and the cycle rules ---------------------------------

# How our outgoing body is framed (RFC 9112 §6).
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3


class Http1Codec(ABC):
    """One HTTP/1.x connection, sans-I/O: ``receive_data`` parses, ``send`` serialises.

    ``role="server"`` faces a downstream: it parses requests and serialises
    responses. ``role="client"`` faces an upstream: it serialises requests
    and parses responses (it learns each request's method from ``send``,
    which is how HEAD and CONNECT responses are framed, RFC 9112 §6.3).

    Cycle rules (shared by every backend, implemented here once): a cycle is
    one request and its response. ``receive_data`` never returns events of
    the next pipelined request before ``start_next_cycle()``; when it holds
    input back its result ends with ``PAUSED``. After an Upgrade/CONNECT
    is accepted both states are ``SWITCHED_PROTOCOL`` and ``trailing_data``
    hands back the raw bytes that followed the head. A ProtocolError or
    Reset latches the receiving side in ERROR.
    """

    __slots__ = (
        "role",
        "limits",
        "_their",
        "_our",
        "_keep_alive",
        "_pending",
        "_eof",
        "_method",
        "_peer_version",
        "_upgrade",
        "_send_mode",
        "_send_left",
        "_send_trailers",
    )

    def __init__(self, role: Role, limits: Http1Limits = DEFAULT_LIMITS) -> None:
        if role != "server" and role != "client":
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        self.role: Role = role
        self.limits = limits
        self._their: str = IDLE
        self._our: str = IDLE
        self._keep_alive = True
        # Parsed events not yet handed out; may hold later pipelined cycles.
        self._pending: deque[Event] = deque()
        self._eof = False
        self._method = b""
        self._peer_version = b"1.1"
        self._upgrade = False
        self._send_mode = NO_BODY
        self._send_left = 0
        self._send_trailers: Headers | None = None

    # -- queries -------------------------------------------------------------

    @property
    def their_state(self) -> str:
        """State of the peer's side: IDLE, SEND_BODY, DONE, MUST_CLOSE, ... (see module constants)."""
        if self._their is DONE and not self._keep_alive:
            return MUST_CLOSE
        return self._their

    @property
    def our_state(self) -> str:
        if self._our is DONE and not self._keep_alive:
            return MUST_CLOSE
        return self._our

    @property
    def cycle_done(self) -> bool:
        """Both sides are DONE and the connection persists: ``start_next_cycle`` may follow."""
        return self._our is DONE and self._their is DONE and self._keep_alive

    @property
    def at_rest(self) -> bool:
        """Between messages with nothing held: the next bytes begin a new message.

        Backends that can vouch for their input buffer say so (the fast one does);
        False otherwise, which only forgoes shortcuts.
        """
        return False

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another cycle once both sides are DONE."""
        return self._keep_alive

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the head of an accepted Upgrade/CONNECT (takes them)."""
        return self._take_trailing()

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: Buffer) -> list[Event | object]:
        """Feed bytes from the peer; return the events of the current cycle.

        ``b""`` is not EOF (use ``receive_eof``): it only releases events
        held back, e.g. after ``start_next_cycle``.
        """
        their = self._their
        if their is ERROR or their is CLOSED:
            return []
        if data:
            self._feed(data)
        return self._release()

    def receive_eof(self) -> list[Event | object]:
        """The peer closed its sending side: End a read-until-close body, else Reset mid-message."""
        if self._their is ERROR or self._their is CLOSED or self._eof:
            return []
        self._eof = True
        self._feed_eof()
        return self._release()

    def _release(self) -> list[Event | object]:
        out: list[Event | object] = []
        pending = self._pending
        their = self._their
        while pending:
            if their in _CYCLE_OVER:
                break
            ev = pending.popleft()
            kind = type(ev)
            if kind is Body or kind is Trailers:
                out.append(ev)
                continue
            if kind is RequestHead:
                their = SEND_BODY
                self._method = ev.method  # type: ignore[union-attr]
                self._peer_version = ev.http_version  # type: ignore[union-attr]
                self._upgrade = ev.upgrade  # type: ignore[union-attr]
                if not ev.keep_alive:  # type: ignore[union-attr]
                    self._keep_alive = False
            elif kind is ResponseHead:
                status = ev.status  # type: ignore[union-attr]
                if status == 101 and self._upgrade:
                    their = self._our = SWITCHED_PROTOCOL
                elif status >= 200:
                    if self._method == b"CONNECT" and status < 300:
                        # RFC 9110 §9.3.6: a 2xx to CONNECT makes the connection a tunnel.
                        their = self._our = SWITCHED_PROTOCOL
                    else:
                        their = SEND_BODY
                        if self._our is MIGHT_SWITCH_PROTOCOL:
                            self._our = DONE
                        if not ev.keep_alive:  # type: ignore[union-attr]
                            self._keep_alive = False
            elif kind is End:
                if self.role == "server" and self._upgrade:
                    their = MIGHT_SWITCH_PROTOCOL
                else:
                    their = DONE
            else:  # ProtocolError, Reset: latch
                their = ERROR
                self._keep_alive = False
                pending.clear()
            out.append(ev)
        self._their = their
        if their in _CYCLE_OVER:
            if pending or self._holding():
                out.append(PAUSED)
        elif self._eof and their is IDLE and not pending:
            self._their = CLOSED
        return out

    # -- sending -------------------------------------------------------------

    def send(self, event: Event) -> Buffer:
        """Serialise one event; returns the bytes to write (Body data may come back uncopied)."""
        kind = type(event)
        if kind is Body:
            if self._our is not SEND_BODY:
                raise CodecUsageError("Body outside a message")
            data = event.data  # type: ignore[union-attr]
            mode = self._send_mode
            if mode is LENGTH:
                left = self._send_left - len(data)
                if left < 0:
                    raise CodecUsageError("Body exceeds Content-Length")
                self._send_left = left
            elif mode is NO_BODY and len(data):
                raise CodecUsageError("this message cannot carry a body")
            return self._encode_body(data, mode)
        if kind is End:
            return self._send_end()
        if kind is RequestHead:
            return self._send_request(event)  # type: ignore[arg-type]
        if kind is ResponseHead:
            return self._send_response(event)  # type: ignore[arg-type]
        if kind is Trailers:
            if self._our is not SEND_BODY or self._send_mode is not CHUNKED:
                raise CodecUsageError("Trailers need a chunked message (RFC 9112 §7.1.2)")
            self._send_trailers = event.headers  # type: ignore[union-attr]
            return b""
        raise CodecUsageError(f"cannot send {kind.__name__} on HTTP/1")

    def send_message(self, head: RequestHead | ResponseHead, body: Buffer) -> Buffer:
        """A whole message at once (head, body, end): the bytes of the three ``send`` calls."""
        out = self.send(head)
        if body:
            out = b"".join((out, self.send(Body(body))))
        end = self.send(END)
        return b"".join((out, end)) if end else out

    def _send_request(self, ev: RequestHead) -> Buffer:
        if self.role != "client" or self._our is not IDLE:
            raise CodecUsageError("RequestHead needs role='client' in state IDLE")
        facts = facts_of(ev.headers)
        self._method = ev.method
        self._upgrade = ev.method == b"CONNECT" or (facts.upgrade_field and facts.upgrade_token)
        if facts.close:
            self._keep_alive = False
        if facts.content_length is not None:
            mode, self._send_left = LENGTH, facts.content_length
        elif facts.chunked:
            mode = CHUNKED
        else:
            # RFC 9112 §6.3 (7): a request without framing fields has no content.
            mode = NO_BODY
        self._send_mode = mode
        out = self._encode_request(ev, mode)
        self._our = SEND_BODY
        return out

    def _send_response(self, ev: ResponseHead) -> Buffer:
        their = self._their
        if self.role != "server" or self._our is not IDLE or their is IDLE:
            raise CodecUsageError("ResponseHead needs role='server', a request, and state IDLE")
        status = ev.status
        if status < 200:
            if status == 101:
                if their is not MIGHT_SWITCH_PROTOCOL:
                    raise CodecUsageError("101 without a completed Upgrade request")
                out = self._encode_response(ev, NO_BODY, None)
                self._their = self._our = SWITCHED_PROTOCOL
                return out
            return self._encode_response(ev, NO_BODY, None)
        if their is MIGHT_SWITCH_PROTOCOL:
            if self._method == b"CONNECT" and status < 300:
                out = self._encode_response(ev, NO_BODY, None)
                self._their = self._our = SWITCHED_PROTOCOL
                return out
            # Upgrade declined: the bytes after the request are HTTP again.
            self._their = DONE
        facts = facts_of(ev.headers)
        if facts.close:
            self._keep_alive = False
        peer_11 = self._peer_version == b"1.1"
        if not has_body(status, self._method):
            mode = NO_BODY
        elif facts.content_length is not None:
            mode, self._send_left = LENGTH, facts.content_length
        elif peer_11:
            # Chunked whether or not the field is there yet (the encoder adds it).
            mode = CHUNKED
        else:
            # RFC 9112 §6.3 (8): an HTTP/1.0 peer gets a body delimited by close.
            mode = UNTIL_CLOSE
            self._keep_alive = False
        self._send_mode = mode
        out = self._encode_response(ev, mode, facts)
        self._our = SEND_BODY
        return out

    def _send_end(self) -> Buffer:
        if self._our is not SEND_BODY:
            raise CodecUsageError("End outside a message")
        if self._send_mode is LENGTH and self._send_left:
            raise CodecUsageError("End before Content-Length bytes were sent")
        out = self._encode_end(self._send_mode, self._send_trailers)
        self._send_trailers = None
        if self.role == "client" and self._upgrade:
            self._our = MIGHT_SWITCH_PROTOCOL if self._their is not DONE else DONE
        else:
            self._our = DONE
        return out

    # -- cycles --------------------------------------------------------------

    def start_next_cycle(self) -> None:
        """Both sides DONE and keep-alive: reset for the next request on this connection.

        Call ``receive_data(b"")`` afterwards to get any pipelined request.
        """
        if not (self._our is DONE and self._their is DONE and self._keep_alive):
            raise CodecUsageError(
                f"start_next_cycle in their={self.their_state} our={self.our_state}"
            )
        self._their = self._our = IDLE
        self._method = b""
        self._upgrade = False
        self._send_mode = NO_BODY
        self._next_cycle()

    # -- backend hooks -------------------------------------------------------

    @abstractmethod
    def _feed(self, data: Buffer) -> None:
        """Parse ``data``, appending events to ``self._pending`` (may run ahead of the cycle)."""

    @abstractmethod
    def _feed_eof(self) -> None:
        """Append End (read-until-close body) or Reset (mid-message) to ``self._pending``."""

    @abstractmethod
    def _holding(self) -> bool:
        """Whether unparsed input is buffered (reported to the proxy as PAUSED)."""

    @abstractmethod
    def _take_trailing(self) -> bytes: ...

    @abstractmethod
    def _next_cycle(self) -> None: ...

    @abstractmethod
    def _encode_request(self, ev: RequestHead, mode: int) -> Buffer: ...

    @abstractmethod
    def _encode_response(self, ev: ResponseHead, mode: int, facts: HeadFacts | None) -> Buffer:
        """Serialise a response head; ``facts`` is None for interim and switching responses."""

    @abstractmethod
    def _encode_body(self, data: Buffer, mode: int) -> Buffer: ...

    @abstractmethod
    def _encode_end(self, mode: int, trailers: Headers | None) -> Buffer: ...


def facts_of(headers: Headers) -> HeadFacts:
    """The framing and persistence facts of a head about to be sent with these fields."""
    facts = HeadFacts()
    names = _FACT_NAMES
    for name, value in headers:
        if name in names:
            err = facts.add(name, value)
            if err is not None:
                raise CodecUsageError(f"refusing to send: {err.reason}")
    if facts.unsupported_coding:
        raise CodecUsageError(f"refusing to send: {_UNSUPPORTED_CODING.reason}")
    return facts


_FACT_NAMES: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect", b"upgrade"}
)
