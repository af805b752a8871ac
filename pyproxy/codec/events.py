"""The event vocabulary every codec (HTTP/1, HTTP/2, gRPC) speaks to the rest of the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# Header names are lower-cased bytes, values are bytes exactly as received
# (leading/trailing whitespace trimmed, RFC 9110 §5.5). Order and duplicates are kept.
Headers = list[tuple[bytes, bytes]]

# Anything a socket can send without a copy.
Buffer = bytes | bytearray | memoryview

# The events are treated as immutable but not declared frozen: a frozen dataclass
# sets every field through object.__setattr__, which made building one head cost
# ~2 µs instead of ~0.4, several times per proxied request.


@dataclass(slots=True)
class RequestHead:
    """A request line plus header section (RFC 9112 §3, §5).

    The derived fields are computed once by the parser so the proxy never
    rescans the headers: framing (``content_length`` / ``chunked``),
    persistence (``keep_alive``, RFC 9112 §9.3), ``expect_continue``
    (RFC 9110 §10.1.1) and ``upgrade`` (an ``Upgrade`` offer named in
    ``Connection``, RFC 9110 §7.8, or a CONNECT, RFC 9110 §9.3.6).
    On the sending side only ``method``, ``target`` and ``headers`` matter:
    framing is read from the headers.
    """

    method: bytes
    target: bytes
    headers: Headers = field(default_factory=list)
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    upgrade: bool = False
    # The head's bytes as received, less hop-by-hop lines, when the parser had them
    # whole (HTTP/1.1 only). Valid while the head is forwarded unchanged: the HTTP/1
    # encoder then sends them as they are. Never part of equality.
    wire: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class ResponseHead:
    """A status line plus header section; ``status`` < 200 is an interim response."""

    status: int
    reason: bytes = b""
    headers: Headers = field(default_factory=list)
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    wire: bytes | None = field(default=None, compare=False, repr=False)  # as on RequestHead


@dataclass(slots=True)
class Body:
    """A piece of message content, already de-chunked; never joined with its neighbours."""

    data: Buffer


@dataclass(slots=True)
class Trailers:
    """The trailer section of a chunked message (RFC 9112 §7.1.2); always followed by End."""

    headers: Headers


@dataclass(slots=True)
class End:
    """The message is complete. Use the shared ``END`` instance rather than allocating."""


@dataclass(slots=True)
class Reset:
    """The peer abandoned the message (HTTP/1: closed mid-message; HTTP/2: RST_STREAM)."""

    code: int = 0
    reason: str = ""


@dataclass(slots=True)
class ProtocolError:
    """The peer sent something unacceptable; the connection is latched dead.

    ``status`` is what a server-role proxy should answer downstream
    (400 malformed, 431 header section over limits, 501 unsupported
    transfer-coding or method). On the client role the proxy answers 502;
    ``status`` then only classifies the fault.
    """

    status: int
    reason: str


class _Sentinel:
    """A named singleton, compared with ``is`` (h11's NEED_DATA / PAUSED idea)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


END: Final = End()

# Last element of a receive_data() result when the codec holds input back
# (pipelined requests, bytes after an Upgrade) until the proxy finishes the
# current cycle: stop reading from the socket, that is the backpressure.
PAUSED: Final = _Sentinel("PAUSED")

Event = RequestHead | ResponseHead | Body | Trailers | End | Reset | ProtocolError
