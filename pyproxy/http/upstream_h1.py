"""An HTTP/1.1 upstream connection: a client-role codec over a Stream, bound to one exchange at a
time, parked in the pool (pool.py) between exchanges."""

from __future__ import annotations

import socket

from pyproxy.addresses import Address
from pyproxy.codec.events import (
    END,
    PAUSED,
    Body,
    End,
    ProtocolError,
    Reset,
    ResponseHead,
    Trailers,
)
from pyproxy.counters import UPSTREAM_RX, UPSTREAM_TX
from pyproxy.http.context import HttpContext
from pyproxy.http.http1_side import Http1Side
from pyproxy.http.seams import ResponseSink
from pyproxy.io.stream import Stream


class Http1Upstream(Http1Side):
    """One upstream connection: a client-role codec over a Stream; bound to at most one exchange."""

    multiplexed = False  # HTTP/2 upstream streams share a connection (upstream_h2.py)

    __slots__ = (
        "ctx",
        "key",
        "stream",
        "codec",
        "exchange",
        "reused",
        "answered",
        "idle_timeout",
        "idle_since",
        "protocol",
    )

    def __init__(
        self, ctx: HttpContext, key: Address, sock: socket.socket, idle_timeout: float
    ) -> None:
        self.ctx = ctx
        self.key = key
        read_stage, write_stage = ctx.upstream_stages
        self.stream = Stream(
            ctx.loop, sock, ctx.block, self, timed=ctx.timed, read_stage=read_stage, write_stage=write_stage,
            rx_slot=UPSTREAM_RX, tx_slot=UPSTREAM_TX, claim_end=ctx.claim_end,
        )  # fmt: skip
        self.codec = ctx.client_codec()
        self.exchange: ResponseSink | None = None
        self.reused = False
        self.answered = False  # a byte of the current request's response arrived
        self.idle_timeout = idle_timeout
        self.idle_since = 0.0
        self.protocol = "HTTP/1.1"

    # ---- used by the exchange ------------------------------------------------

    def bind(self, exchange: ResponseSink) -> None:
        self.exchange = exchange
        self.stream.trace = exchange.trace
        self.stream.resume_reading()

    send = Http1Side.encode  # the exchange's name for it

    def send_whole(self, head) -> None:
        """A bodyless request: head and end in one call."""
        self.encode(head, b"")

    def pause_response(self) -> None:
        self.stream.pause_reading()

    def resume_response(self) -> None:
        if self.exchange is not None:
            self.stream.resume_reading()

    def abort(self) -> None:
        self.exchange = None
        self.stream.close(reset=True)
        self.ctx.pool.forget(self)

    def reusable(self) -> bool:
        return not self.stream.closed and self.codec.cycle_done

    def park(self) -> None:
        """Back in the pool: keep reading, so a close by the app is noticed while idle."""
        self.exchange = None
        self.stream.trace = None
        self.codec.start_next_cycle()
        self.reused = True
        self.answered = False
        self.stream.resume_reading()

    @property
    def retry_safe(self) -> bool:
        """A pooled connection that closed before any byte of this request's response: the app
        closed it as we reused it (the keep-alive race), so the request was never processed."""
        return self.reused and not self.answered

    # ---- StreamOwner ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.answered = True
        events = self.decode(data)
        exchange = self.exchange
        if (
            exchange is not None
            and exchange.forwards_unchanged
            and events
            and events[-1] is END
            and type(events[0]) is ResponseHead
            and self._forward_whole(exchange, events)
        ):
            return  # a small response, read whole: forwarded as it came (the common case)
        if exchange is None:
            self._dispatch(events)
            return
        # Head, body and end of a response read together leave in one send, not three.
        downstream = exchange.downstream
        downstream.cork()
        try:
            self._dispatch(events)
        finally:
            downstream.uncork()

    @staticmethod
    def _forward_whole(exchange: ResponseSink, events: list) -> bool:
        if len(events) == 2:
            return exchange.response_whole(events[0], b"")
        if len(events) == 3 and type(events[1]) is Body:
            return exchange.response_whole(events[0], events[1].data)
        return False

    def _dispatch(self, events: list) -> None:
        for event in events:
            exchange = self.exchange
            if exchange is None:
                # Bytes from an idle pooled connection are a protocol violation: drop the connection.
                self._broken()
                return
            kind = type(event)
            if kind is Body:
                exchange.response_body(event.data)
            elif kind is ResponseHead:
                exchange.response_head(event)
            elif kind is End:
                exchange.response_end()
            elif kind is Trailers:
                # The response's end: the exchange is over (and this connection back in the
                # pool) before the End event that follows, which has nothing left to do.
                exchange.response_trailers(event.headers)
                return
            elif kind is ProtocolError:
                self._fail("UPE")
                return
            elif kind is Reset:
                self._fail("UC")
                return
            elif event is PAUSED:
                self.stream.pause_reading()

    def eof_received(self) -> None:
        self._dispatch(self.codec.receive_eof())
        if self.exchange is not None:
            self._fail("UC")
        else:
            self._broken()

    def stream_failed(self, error: OSError) -> None:
        self._fail("UC")

    def write_paused(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def write_resumed(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    def _fail(self, flag: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.stream.close(reset=flag != "UC")
        self.ctx.pool.forget(self)
        if exchange is not None:
            exchange.upstream_failed(flag)

    def _broken(self) -> None:
        self.exchange = None
        self.ctx.pool.forget(self)
        self.stream.close()
