"""A chunked body's framing lines held to the grammar llhttp enforces, for the h11 backend.

h11 takes more than RFC 9112 §7.1 allows: anything after a chunk size's ";",
whitespace before the line end, a bare LF ending a trailer line or the last
one, obs-fold in trailers (RFC 9112 §5.2). llhttp refuses all of these with
400; so must the h11 backend, or the answer would depend on the configured
backend. This follows the raw bytes of one chunked body beside h11 and records
the first fault, with how many content bytes came before it: the codec passes
h11's content on up to that point and then fails, as llhttp does.

The trailer section is held to the header size limit by its raw bytes (its
first field line through the empty line), however the reads split it: past the
limit, only its first ``limit`` bytes are judged (a fault in them is 400, none
is 431). Both backends follow their chunked bodies with this; the fast one
feeds llhttp no more of an oversized section than those bytes.
"""

from __future__ import annotations

import re
from typing import Final

from pyproxy.codec.http1 import NOT_TRAILERS

# chunk-size [ chunk-ext ] CRLF, with llhttp's reading of chunk-ext: no whitespace around
# ";" or "=", a token name, an optional token or quoted-string value (which may be empty).
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_SIZE_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]+)(?:;%s(?:=(?:%s|%s)?)?)*\r\n" % (_TOKEN, _TOKEN, _QUOTED)
)

# A trailer line llhttp takes (field-name ":" field-value CRLF, no controls but HTAB), and
# what llhttp takes without complaint of one cut short.
_VALUE: Final = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELD_LINE: Final = re.compile(rb"%s:%s\r\n" % (_TOKEN, _VALUE))
_FIELD_LINE_START: Final = re.compile(rb"(?:%s:%s\r?|%s|\r)?" % (_TOKEN, _VALUE, _TOKEN))

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkLines:
    """Feed every byte after the head; ``error`` is the first framing fault (or None),
    ``status`` its answer (400, or 431 for a trailer section over ``limit`` bytes with no
    fault in its first ``limit``) and ``content_before_error`` the content bytes that
    preceded it. Bytes after the body's last line are not looked at (``done``)."""

    __slots__ = (
        "_state",
        "_line",
        "_left",
        "_content",
        "_limit",
        "_trailer_bytes",
        "error",
        "status",
        "content_before_error",
    )

    def __init__(self, limit: int) -> None:
        self._state = _SIZE
        self._line = bytearray()
        self._left = 0  # content bytes of the current chunk still due, or CRLF bytes after it
        self._content = 0
        self._limit = limit
        self._trailer_bytes = 0  # the trailer section's bytes in whole lines so far
        self.error: str | None = None
        self.status = 400
        self.content_before_error = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> int:
        """Follow ``data``; where in it the trailer section passed the limit, or -1."""
        pos, end = 0, len(data)
        while pos < end and self.error is None:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                pos += take
                self._content += take
                self._left -= take
                if not self._left:
                    self._state, self._left = _DATA_END, 2
            elif state == _DATA_END:
                if data[pos] != (13 if self._left == 2 else 10):
                    self._fail("chunk not followed by CRLF")
                pos += 1
                self._left -= 1
                if not self._left:
                    self._state = _SIZE
            elif state == _DONE:
                return -1
            else:
                newline = data.find(b"\n", pos)
                if state == _TRAILER:
                    room = self._limit - self._trailer_bytes - len(self._line)
                    if (newline + 1 if newline >= 0 else end) - pos > room:
                        self._over(bytes(self._line) + data[pos : pos + room])
                        return pos + room
                if newline < 0:
                    self._line += data[pos:]
                    return -1
                self._line += data[pos : newline + 1]
                pos = newline + 1
                self._end_of_line(bytes(self._line))
                self._line.clear()
        return -1

    def _end_of_line(self, line: bytes) -> None:
        if self._state == _SIZE:
            match = _SIZE_LINE.fullmatch(line)
            if match is None:
                self._fail("malformed chunk size line")
                return
            size = int(match.group(1), 16)
            self._state, self._left = (_DATA, size) if size else (_TRAILER, 0)
        elif line[-2:] != b"\r\n" or b"\r" in line[:-2]:
            self._fail("trailer line not ended by CRLF")  # RFC 9112 §2.2
        elif line == b"\r\n":
            self._state = _DONE
        elif line[0] == 32 or line[0] == 9:
            self._fail("obs-fold in trailers")  # RFC 9112 §5.2
        elif _FIELD_LINE.fullmatch(line) is None:
            self._fail("malformed trailer line")
        elif line[: line.index(b":")].lower() in NOT_TRAILERS:
            self._fail("framing field in trailers")  # llhttp refuses them mid-line
        else:
            self._trailer_bytes += len(line)

    def _over(self, first: bytes) -> None:
        """The trailer section passed the limit: judged on the rest of its first bytes."""
        name, colon, value = first.partition(b":")
        name = name.lower()
        if _FIELD_LINE_START.fullmatch(first) is None:
            self._fail("malformed trailer line")
        elif colon and (
            # llhttp refuses these at the colon, and at the first byte of a value.
            name == b"content-length"
            or (name == b"transfer-encoding" and value.rstrip(b"\r").strip(b" \t"))
        ):
            self._fail("framing field in trailers")
        else:
            self._fail("trailer section over limits", 431)

    def _fail(self, reason: str, status: int = 400) -> None:
        self.error = reason
        self.status = status
        self.content_before_error = self._content
