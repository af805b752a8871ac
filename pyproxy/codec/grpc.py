"""gRPC framing and call semantics, sans-I/O: length-prefixed messages, status, deadlines, local replies.

A gRPC message on the wire is 1 byte compressed-flag, 4 bytes big-endian
length, then the payload (gRPC over HTTP/2 spec, "Length-Prefixed-Message").
DATA frames cut messages anywhere, so the framer keeps only the unfinished
tail; complete payloads are handed out as memoryview slices of the received
chunk whenever a message lies inside one chunk (no copy), and joined only
when a message spans chunks. Protobuf is never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PREFIX: Final = 5

# grpc-status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED = 5, 6, 7, 8
FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED = 9, 10, 11, 12
INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED = 13, 14, 15, 16
STATUS_NAMES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's own default receive limit

# HTTP status → grpc-status when an upstream answers without gRPC trailers
# (gRPC "HTTP to gRPC Status Code Mapping").
HTTP_TO_GRPC: Final = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


class FramingError(Exception):
    """Malformed framing: the call is answered INTERNAL and its stream reset (other streams go on)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Message:
    compressed: bool
    data: bytes | memoryview


def read_prefix(data, pos: int, max_size: int) -> tuple[int, int]:
    """The compressed flag and length at `pos`; FramingError for a bad flag or an oversized message."""
    flag = data[pos]
    if flag > 1:
        raise FramingError(INTERNAL, f"invalid compressed flag {flag}")
    size = int.from_bytes(data[pos + 1 : pos + PREFIX], "big")
    if size > max_size:
        raise FramingError(
            RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds the {max_size}-byte limit"
        )
    return flag, size


class MessageFramer:
    """Splits one direction of a call into messages; bytes in, messages out."""

    __slots__ = ("max_size", "_tail", "messages", "bytes")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._tail = b""
        self.messages = 0
        self.bytes = 0

    def feed(self, data: bytes | memoryview) -> list[Message]:
        """Return every message completed by `data`; raise FramingError on a bad flag or size."""
        if self._tail:
            buf = memoryview(self._tail + bytes(data))
        else:
            buf = memoryview(data)
        out: list[Message] = []
        pos, end = 0, len(buf)
        while end - pos >= PREFIX:
            flag, size = read_prefix(buf, pos, self.max_size)
            if end - pos - PREFIX < size:
                break
            start = pos + PREFIX
            out.append(Message(flag == 1, buf[start : start + size]))
            pos = start + size
            self.messages += 1
            self.bytes += size
        # An unfinished message stays as the tail (its size was already checked above, so an
        # oversized message fails as soon as its prefix arrives, not after buffering it).
        self._tail = bytes(buf[pos:]) if pos < end else b""
        return out

    def finish(self) -> None:
        """End of stream: a partial message left over is a truncated call."""
        if self._tail:
            raise FramingError(
                INTERNAL, f"stream ended inside a message ({len(self._tail)} bytes buffered)"
            )

    @property
    def buffered(self) -> int:
        return len(self._tail)


class MessageScanner:
    """Counts one direction's messages as bytes stream past, holding nothing but a split prefix.

    A proxy forwards the payload untouched, so it only needs each message's
    boundary, flag and size: payload bytes are skipped by arithmetic, never
    buffered (the framer above would join a 4 MiB message spread over 256
    DATA frames; this keeps at most 4 bytes of a prefix cut by a frame).
    Same checks as MessageFramer: the flag, and the size limit at the prefix.
    """

    __slots__ = ("max_size", "messages", "bytes", "_skip", "_prefix")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_size = max_size
        self.messages = 0
        self.bytes = 0
        self._skip = 0  # payload bytes of the current message still to come
        self._prefix = b""  # the start of a prefix cut by a chunk boundary

    def feed(self, data: bytes | memoryview) -> int:
        """Return how many messages `data` completed; raise FramingError on a bad flag or size."""
        end = len(data)
        skip = self._skip
        pos = done = 0
        if skip:
            if skip > end:
                self._skip = skip - end
                return 0
            pos, done = skip, 1  # the message in progress ends inside this chunk
        elif self._prefix:
            need = PREFIX - len(self._prefix)
            if end < need:
                self._prefix += bytes(data[:end])
                return 0
            head = self._prefix + bytes(data[:need])
            self._prefix = b""
            size = self._check(head, 0)
            pos = need + size
            if pos <= end:
                done += 1
        while pos + PREFIX <= end:
            size = self._check(data, pos)
            pos += PREFIX + size
            if pos <= end:
                done += 1
        if pos < end:
            # Fewer than PREFIX bytes left: a prefix cut by the chunk boundary.
            self._prefix = bytes(data[pos:end])
            self._skip = 0
        else:
            self._skip = pos - end
        self.messages += done
        return done

    def _check(self, data, pos: int) -> int:
        _, size = read_prefix(data, pos, self.max_size)
        self.bytes += size
        return size

    @property
    def at_boundary(self) -> bool:
        """Nothing of a message is half-way: what was forwarded so far is whole messages."""
        return not self._skip and not self._prefix

    def finish(self) -> None:
        """End of stream: a partial message left over is a truncated call."""
        if not self.at_boundary:
            raise FramingError(INTERNAL, "stream ended inside a message")


def frame(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(payload).to_bytes(4, "big") + payload


# --- call semantics --------------------------------------------------------------

_TIMEOUT_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout: up to 8 ASCII digits and a unit (H M S m u n); None if malformed."""
    if not 2 <= len(value) <= 9:
        return None
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def method_of(path: bytes) -> str:
    """`/package.Service/Method` → `package.Service/Method` (metrics label); other paths as-is."""
    text = path.decode("latin-1")
    return text[1:] if text.startswith("/") and text.count("/") == 2 else text


def is_grpc(content_type: bytes | None) -> bool:
    # "application/grpc" optionally followed by "+proto", "+json", ";..."
    return content_type is not None and content_type[:16].lower() == b"application/grpc"


def percent_encode(message: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2 spec)."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def status_from_headers(headers) -> tuple[int | None, bytes]:
    """The call's grpc-status and grpc-message from trailers (or a trailers-only head)."""
    status, message = None, b""
    for name, value in headers:
        if name == b"grpc-status":
            status = int(value) if value.isdigit() else UNKNOWN
        elif name == b"grpc-message":
            message = value
    return status, message


def trailers_only_headers(grpc_status: int, message: str) -> list[tuple[bytes, bytes]]:
    """The header block of a trailers-only response: HTTP 200, application/grpc, the status."""
    headers = [(b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % grpc_status)]
    if message:
        headers.append((b"grpc-message", percent_encode(message)))
    return headers
