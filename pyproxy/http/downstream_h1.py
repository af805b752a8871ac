"""An HTTP/1.1 downstream connection: parses requests, runs one exchange at a time, keeps alive.

Pipelined requests are answered in order: the codec holds the next request
back (PAUSED) until the current exchange ends, and reading stops meanwhile,
so pipelining cannot make the proxy buffer without bound.
"""

from __future__ import annotations

import socket
from typing import Any

from pyproxy.addresses import Address
from pyproxy.codec.events import END, PAUSED, Body, End, ProtocolError, RequestHead, Reset, Trailers
from pyproxy.codec.http1 import reject_reason
from pyproxy.counters import (
    DOWNSTREAM_RX,
    DOWNSTREAM_TX,
    FLAG_BASE,
    FLAG_INDEX,
    REQUESTS,
    STAGES,
    count_status,
    reject_slot,
)
from pyproxy.http.context import HttpContext
from pyproxy.http.exchange import Exchange
from pyproxy.http.http1_side import Http1Side
from pyproxy.http.local_reply import local_reply_head
from pyproxy.http.seams import RequestSink
from pyproxy.io.stream import Stream


class Http1Downstream(Http1Side):
    __slots__ = (
        "ctx",
        "stream",
        "codec",
        "exchange",
        "on_close",
        "target",
        "source",
        "_held",
        "_timer",
        "_closing_after",
        "_draining",
        "_head_out",
        "_want_reading",
        "_closed",
        "protocol",
        "lane",
    )

    def __init__(
        self, ctx: HttpContext, sock: socket.socket, on_close, target: Address, source: str
    ) -> None:
        self.ctx = ctx
        read_stage, write_stage = ctx.downstream_stages
        self.stream = Stream(
            ctx.loop, sock, ctx.block, self, timed=ctx.timed, read_stage=read_stage, write_stage=write_stage,
            rx_slot=DOWNSTREAM_RX, tx_slot=DOWNSTREAM_TX, claim_end=ctx.claim_end,
        )  # fmt: skip
        self.codec = ctx.server_codec()
        self.exchange: Exchange | None = None
        self.on_close = on_close
        self.target, self.source = target, source
        self._held = False  # the codec holds a pipelined request back until this cycle ends
        self._closing_after = False  # answer the current request, then close
        self._draining = False  # asked to close at the first response that can say so
        self._head_out = False  # the current response's head is sent (it says what it says)
        self._want_reading = True
        self._closed = False
        self._timer = ctx.loop.call_later(ctx.settings.request_header_timeout, self._header_timeout)
        self.protocol = "HTTP/1.1"
        self.lane: Any = None  # the native lane this connection is paired in (native_lane.py)

    def start(self) -> None:
        self.stream.resume_reading()

    def default_target(self) -> tuple[Address, str]:
        """Where a request goes when its route names no cluster: the listener's upstream, or where
        the client was going (capture), with the source address to bind (inbound: 127.0.0.6)."""
        return self.target, self.source

    # ---- bytes in ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        ctx = self.ctx
        events = self.decode(data)
        if self.exchange is None and self._timer is None and not events:
            # First bytes of a new request on a kept-alive connection: the slowloris clock starts.
            self._timer = ctx.loop.call_later(
                ctx.settings.request_header_timeout, self._header_timeout
            )
        self._dispatch(events)

    def _dispatch(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is Body:
                if self.exchange is not None:
                    self.exchange.request_body(event.data)
            elif kind is RequestHead:
                self._start_exchange(event)
            elif kind is End:
                if self.exchange is not None:
                    self.exchange.request_end()
            elif event is PAUSED:
                self.stream.pause_reading()
                if self.exchange is None and not self._closed:
                    # The exchange already ended inside this batch (a local reply) and started
                    # the next cycle: nothing will end it again, so release the held request now.
                    self.ctx.loop.call_soon(self._release_held)
                else:
                    self._held = True
            elif kind is Trailers:
                if self.exchange is not None:
                    self.exchange.request_trailers(event.headers)
            elif kind is ProtocolError:
                self._protocol_error(event)
                return
            elif kind is Reset:
                self._downstream_gone()
                return

    def _start_exchange(self, head: RequestHead) -> None:
        if head.method == b"CONNECT":
            # RFC 9110 §9.1: a method the server does not implement is answered 501. A sidecar
            # relays to its one service; a tunnel would bypass every filter on the route.
            self._protocol_error(ProtocolError(501, "CONNECT is not relayed"))
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ctx = self.ctx
        ctx.block[REQUESTS] += 1
        wants_trace = ctx.settings.server_timing or ctx.access_log is not None
        trace = [0] * len(STAGES) if wants_trace else None
        self.stream.trace = trace
        self.exchange = Exchange(ctx, self, head, trace)
        self.exchange.start()

    def _protocol_error(self, error: ProtocolError) -> None:
        """Malformed or over-limit request: answer with its status and close (RFC 9112 §2.2)."""
        block = self.ctx.block
        block[reject_slot(reject_reason(error))] += 1
        body = (error.reason + "\n").encode()
        if self.exchange is not None:
            # Mid-body: the exchange answers (it counts the flag and status) and closes.
            self.exchange.request_malformed(error.status, body)
            return
        block[FLAG_BASE + FLAG_INDEX["DPE"]] += 1
        count_status(block, error.status)
        self._reply_and_close(error.status, body)

    def _reply_and_close(self, status: int, body: bytes) -> None:
        # The codec is latched in ERROR: write a fixed response directly.
        head = local_reply_head(status, len(body), keep_alive=False)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, head.reason)]
        lines += [name + b": " + value + b"\r\n" for name, value in head.headers]
        self.stream.write(b"".join(lines) + b"\r\n" + body)
        self._close(after_flush=True)

    def _header_timeout(self) -> None:
        self._timer = None
        if self.exchange is not None:
            return
        block = self.ctx.block
        block[FLAG_BASE + FLAG_INDEX["DT"]] += 1
        count_status(block, 408)
        self._reply_and_close(408, b"request header timeout\n")

    def eof_received(self) -> None:
        events = self.codec.receive_eof()
        self._dispatch(events)
        if self.exchange is None:
            self._close()
        elif self.exchange.request_done:
            self._closing_after = (
                True  # the client half-closed after a full request: answer, then close
            )
        else:
            self._downstream_gone()

    def stream_failed(self, error: OSError) -> None:
        self._downstream_gone()

    def _downstream_gone(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.downstream_reset()
        self._close(reset=True)

    # ---- flow control --------------------------------------------------------------

    def write_paused(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream_write_paused()

    def write_resumed(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream_write_resumed()

    def pause_request(self) -> None:
        self._want_reading = False
        self.stream.pause_reading()

    def resume_request(self) -> None:
        self._want_reading = True
        if not self._held and not self.stream.closed:
            self.stream.resume_reading()

    # ---- bytes out (called by the exchange) --------------------------------------

    def cork(self) -> None:
        self.stream.cork()

    def uncork(self) -> None:
        self.stream.uncork()

    def send_interim(self, head) -> None:
        self.encode(head)

    def send_head(self, head) -> None:
        if self._closing_after:
            head.headers.append((b"connection", b"close"))
            head.wire = None
        self._head_out = True
        self.encode(head)

    def send_whole(self, head, body) -> bool:
        """Head, body and end in one go; False (nothing sent) when this response needs more care."""
        if self._closing_after:
            return False
        self._head_out = True
        self.encode(head, body)
        return True

    def send_body(self, data) -> None:
        self.encode(Body(data))

    def send_trailers(self, headers) -> None:
        self.encode(Trailers(headers))

    def send_end(self) -> None:
        self.encode(END)

    # ---- cycle end --------------------------------------------------------------------

    def exchange_done(self, exchange: RequestSink, reset: bool = False) -> None:
        self.exchange = None
        self.stream.trace = None
        self._head_out = False
        if reset:
            self._close(reset=True)
            return
        codec = self.codec
        if self._closing_after or not codec.cycle_done:
            # Request not fully read (early reply), or not persistent: finish writing, then close.
            self._close(after_flush=True)
            return
        codec.start_next_cycle()
        if self._draining:
            # Drained while this response went out saying keep-alive: the client may be sending
            # its next request already. That one is answered, and its response says close.
            self._closing_after = True
        if self._held:
            self._held = False
            self.ctx.loop.call_soon(
                self._release_held
            )  # not re-entrantly: the exchange is still unwinding
        else:
            if self._want_reading:
                self.stream.resume_reading()
            else:
                self.resume_request()
            lanes = self.ctx.native_lanes
            if lanes is not None and self.codec.at_rest and not self._closing_after:
                lanes.pair(self)  # at rest between requests: the next ones may go in C

    def resume_sent(self, route, upstream, data: bytes, started_ns: int, chain, late=None) -> None:
        """A request the native lane read at ``started_ns`` and sent on ``upstream`` comes back
        before its response: this connection's codec reads it, and an Exchange carries it on
        (with ``chain``, its filters' pass, when its route has filters; or ``late``, the
        factory of a chain with no request-header filter that has not started yet)."""
        events = self.decode(data)  # the request head, its body if any, its end
        body = events[1].data if type(events[1]) is Body else b""
        self.exchange = exchange = Exchange(self.ctx, self, events[0], None)
        exchange.adopt_sent(route, upstream, body, started_ns, chain, late)

    def take_request(
        self, data: bytes, route, chain, passed: bool, reply: tuple | None,
        through: list | None = None,
    ) -> None:  # fmt: skip
        """A whole request the native lane read and ran through its route's filters (``chain``)
        but did not send: this connection's codec reads it, and an Exchange carries it on from
        the filters' verdict (see Exchange.adopt_chain). ``through``: when the lane ran its body
        through them too, what they let through (the body itself is not fed again). Counted
        here, as a request read is."""
        self._cancel_timer()
        self.ctx.block[REQUESTS] += 1
        events = self.decode(data)  # the request head, its body if any, its end
        self.exchange = exchange = Exchange(self.ctx, self, events[0], None)
        if through is None:
            exchange.adopt_chain(route, chain, passed, reply)
            self._dispatch(events[1:])
        else:
            body = events[1].data if type(events[1]) is Body else b""
            exchange.adopt_fed(route, chain, reply, len(body), through)

    def _release_held(self) -> None:
        if self.stream.closed:
            return
        self.data_received(b"")
        if self.exchange is None and not self._held and not self.stream.closed:
            self._want_reading = True
            self.stream.resume_reading()

    def switch_to_tunnel(self, upstream) -> None:
        """After 101 (or a 2xx to CONNECT): both sockets become a plain byte relay."""
        self.exchange = None
        self._cancel_timer()
        self._closed = True
        self.on_close(
            self, tunnel=(upstream, self.codec.trailing_data, upstream.codec.trailing_data)
        )

    def start_drain(self) -> None:
        """SIGTERM, /drain_listeners or a reload: the response in flight, or the next one, says
        ``Connection: close`` and the connection closes after it, so the client reconnects (onto
        the new config). A response whose head is already out said keep-alive: the connection
        stays open after it, and the next response says close. An idle connection waits for
        its next request, or the drain deadline: closing it now could race a request the client
        is sending (RFC 9112 §9.6: the client can tell only from a close it was told of)."""
        if self._closed or self._draining:
            return
        self._draining = True
        if not self._head_out:
            self._closing_after = True
        if self.lane is not None:
            self.lane.release()  # back from C: the response must carry the header

    def close(self, flag: str = "LR") -> None:
        """Drain deadline: abandon what is in flight."""
        if self.lane is not None:
            self.lane.release()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.downstream_reset()
        self._close(reset=exchange is not None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self, reset: bool = False, after_flush: bool = False) -> None:
        self._cancel_timer()
        if self._closed:
            return
        self._closed = True
        self.stream.close(reset=reset, after_flush=after_flush)
        self.on_close(self)
