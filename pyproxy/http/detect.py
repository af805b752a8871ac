"""Protocol detection for mode-http listeners: the first bytes decide HTTP/2, HTTP/1 or opaque TCP.

Like linkerd's detect stage: read (not peek, so an incomplete prefix cannot
spin the loop) until the bytes name a protocol, then hand the session every
byte read, in order. On capture listeners anything that is not HTTP — or
silence past `detect_timeout`, the mark of server-first protocols such as
MySQL or SMTP — becomes an opaque TCP relay, so those are never stalled.
"""

from __future__ import annotations

import re
import socket
from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyproxy.addresses import Address
from pyproxy.codec.http2 import PREFACE
from pyproxy.counters import DOWNSTREAM_RX, NOTIFY, STAGE_EVENTS, STAGE_NS

if TYPE_CHECKING:
    from pyproxy.config import ListenerConfig
    from pyproxy.listener import Listener

HTTP1, HTTP2, TCP = "http1", "http2", "tcp"
AUTO, HTTP = "auto", "http"  # still to detect: with or without the TCP fallback

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version CRLF.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/1\.[01]\r?")
# What a request line can look like before its end has arrived.
_REQUEST_LINE_PREFIX = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*(?: [\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.[01]?)?)?)?)?)?)?)?)?)?"
)
MAX_REQUEST_LINE = 8192
READ_SIZE = 16384


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


def protocol_for(config: ListenerConfig, sock: socket.socket, target: Address) -> str:
    """The per-port override, else what `detect` says. The port is where the client was going:
    the original destination on capture listeners, the listening port on standalone ones."""
    if config.ports:
        if config.kind == "standalone":
            port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else None
        else:
            port = target.port
        for candidate, protocol in config.ports:
            if candidate == port:
                return protocol
    return config.detect


class Detector:
    """One accepted connection whose protocol is not known yet; closable by drain like a session."""

    __slots__ = (
        "listener",
        "sock",
        "fd",
        "target",
        "source",
        "started_ns",
        "tcp_fallback",
        "buf",
        "timer",
        "done",
        "read_ns",
        "read_events",
    )

    def __init__(
        self,
        listener: Listener,
        sock: socket.socket,
        target: Address,
        source: str,
        started_ns: int,
        tcp_fallback: bool,
    ) -> None:
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.target, self.source = target, source
        self.started_ns = started_ns
        self.tcp_fallback = tcp_fallback
        self.buf = b""
        self.timer = None
        self.done = False
        http = listener.http
        assert http is not None, "detection runs on mode-http listeners"
        stage = http.downstream_stages[0]
        self.read_ns, self.read_events = STAGE_NS + stage, STAGE_EVENTS + stage

    def start(self) -> None:
        listener = self.listener
        config = listener.config
        # Without a fallback there is no hurry: the slowloris bound applies instead.
        timeout = config.detect_timeout if self.tcp_fallback else config.http.request_header_timeout
        self.timer = listener.loop.call_later(timeout, self._timed_out)
        listener.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        listener = self.listener
        timed = listener.timed
        block = listener.block
        t0 = perf_counter_ns()
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._decide(None)
            return
        if timed:
            block[self.read_ns] += perf_counter_ns() - t0
            block[self.read_events] += 1
            block[STAGE_EVENTS + NOTIFY] += 1
        if not data:
            # EOF: what arrived (if anything) still goes through, opaque.
            self._decide(TCP if self.buf and self.tcp_fallback else None)
            return
        block[DOWNSTREAM_RX] += len(data)
        self.buf += data
        verdict = classify(self.buf, self.tcp_fallback)
        if verdict is not None:
            self._decide(verdict)

    def _timed_out(self) -> None:
        self.timer = None
        if not self.done:
            self._decide(TCP if self.tcp_fallback else None, flag="DT")

    def _decide(self, protocol: str | None, flag: str = "") -> None:
        self.done = True
        listener = self.listener
        listener.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        listener.connections.discard(self)
        if protocol is None:
            listener.drop(self.sock, flag, self.started_ns)
            return
        listener.start_protocol(
            self.sock, self.target, self.source, self.started_ns, protocol, self.buf
        )

    def close(self, flag: str = "LR") -> None:
        if not self.done:
            self._decide(None, flag)
