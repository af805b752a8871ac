"""Protocol detection for mode-http listeners: the first bytes decide HTTP/2, HTTP/1 or opaque TCP.

Like linkerd's detect stage: pyproxy/io/first_bytes.py reads until the bytes
name a protocol, then hands the session every byte read, in order; this module
decides from the bytes alone. On capture listeners anything that is not HTTP —
or silence past `detect_timeout`, the mark of server-first protocols such as
MySQL or SMTP — becomes an opaque TCP relay, so those are never stalled.
"""

from __future__ import annotations

import re

from pyproxy.codec.http2 import PREFACE
from pyproxy.config import ListenerConfig

HTTP1, HTTP2, TCP = "http1", "http2", "tcp"
AUTO, HTTP = "auto", "http"  # still to detect: with or without the TCP fallback

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version CRLF.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/1\.[01]\r?")
# What a request line can look like before its end has arrived.
_REQUEST_LINE_PREFIX = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*(?: [\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.[01]?)?)?)?)?)?)?)?)?)?"
)
MAX_REQUEST_LINE = 8192


def classify(data: bytes, tcp_fallback: bool) -> str | None:
    """HTTP2, HTTP1, TCP, or None while more bytes are needed."""
    n = min(len(data), len(PREFACE))
    if data[:n] == PREFACE[:n]:
        return HTTP2 if n == len(PREFACE) else None
    if not tcp_fallback:
        return HTTP1  # the HTTP/1 parser answers 400 to whatever this is
    end = data.find(b"\n")
    if end < 0:
        if len(data) > MAX_REQUEST_LINE or not _REQUEST_LINE_PREFIX.fullmatch(data):
            return TCP
        return None
    return HTTP1 if _REQUEST_LINE.fullmatch(data, 0, end) else TCP


def protocol_for(config: ListenerConfig, port: int | None) -> str:
    """The per-port override, else what `detect` says. The port is where the client was going:
    the original destination on capture listeners, the listening port on standalone ones."""
    for candidate, protocol in config.ports:
        if candidate == port:
            return protocol
    return config.detect


class Detection:
    """The decision of pyproxy/io/first_bytes.py for one connection, from bytes alone."""

    __slots__ = ("tcp_fallback", "timeout")

    def __init__(self, config: ListenerConfig, protocol: str) -> None:
        """`protocol` is AUTO (capture: anything not HTTP goes through as TCP) or HTTP."""
        self.tcp_fallback = protocol == AUTO
        # Without a fallback there is no hurry: the slowloris bound applies instead.
        self.timeout = (
            config.detect_timeout if self.tcp_fallback else config.http.request_header_timeout
        )

    def on_bytes(self, data: bytes) -> str | None:
        return classify(data, self.tcp_fallback)

    def on_eof(self, data: bytes) -> str | None:
        # What arrived (if anything) still goes through, opaque.
        return TCP if data and self.tcp_fallback else None

    def on_timeout(self) -> str | None:
        return TCP if self.tcp_fallback else None
