"""gRPC framing target: the buffering framer and the counting scanner read the same
messages and fail at the same point, however DATA frames cut the stream."""

from __future__ import annotations

from fuzz.draw import splits
from pyproxy.codec.grpc import (
    PREFIX,
    FramingError,
    MessageFramer,
    MessageScanner,
    frame,
    parse_timeout,
    status_from_headers,
)


def _reference(data: bytes, max_size: int) -> tuple[list[tuple[bool, bytes]], int | None]:
    """The messages and the failing status, read the obvious way from the whole stream."""
    messages, pos = [], 0
    while pos < len(data):
        if len(data) - pos < PREFIX:
            return messages, 13  # INTERNAL: ended inside a prefix
        flag, size = data[pos], int.from_bytes(data[pos + 1 : pos + PREFIX], "big")
        if flag > 1:
            return messages, 13
        if size > max_size:
            return messages, 8  # RESOURCE_EXHAUSTED
        if len(data) - pos - PREFIX < size:
            return messages, 13  # ended inside a message
        messages.append((flag == 1, data[pos + PREFIX : pos + PREFIX + size]))
        pos += PREFIX + size
    return messages, None


def grpc_framing(data: bytes) -> None:
    if len(data) < 2:
        return
    seed, max_size, stream = data[0], data[1] * 3, data[2:]
    expected, failure = _reference(stream, max_size)
    pieces = splits(stream, seed)
    framer, scanner = MessageFramer(max_size), MessageScanner(max_size)
    got: list[tuple[bool, bytes]] = []
    framer_status = scanner_status = None
    try:
        for piece in pieces:
            got += [(m.compressed, bytes(m.data)) for m in framer.feed(piece)]
        framer.finish()
    except FramingError as exc:
        framer_status = exc.status
    counted = 0
    try:
        for piece in pieces:
            counted += scanner.feed(memoryview(piece))
        scanner.finish()
    except FramingError as exc:
        scanner_status = exc.status
    assert framer_status == scanner_status == failure, (framer_status, scanner_status, failure)
    if failure is None:
        assert got == expected, (got, expected)
        assert counted == scanner.messages == len(expected), (counted, len(expected))
        assert scanner.bytes == sum(len(m) for _, m in expected)
    else:
        assert expected[: len(got)] == got, (got, expected)
    for compressed, message in expected:
        again = MessageFramer(max_size).feed(frame(message, compressed))
        assert [(m.compressed, bytes(m.data)) for m in again] == [(compressed, message)]
    timeout = parse_timeout(stream[:10])
    assert timeout is None or timeout >= 0
    status_from_headers([(b"grpc-status", stream[:4]), (b"grpc-message", stream[4:12])])
