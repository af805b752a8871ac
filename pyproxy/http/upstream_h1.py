"""HTTP/1.1 upstream connections and the keep-alive pool they return to between exchanges."""

from __future__ import annotations

import socket
from collections import defaultdict
from typing import TYPE_CHECKING, Any

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
from pyproxy.counters import STAGE_EVENTS, STAGE_NS, UPSTREAM_RX, UPSTREAM_TX
from pyproxy.http.http1_side import Http1Side
from pyproxy.io.connector import Connect
from pyproxy.io.stream import Stream

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.exchange import Exchange
    from pyproxy.http.router import Cluster
    from pyproxy.http.upstream_h2 import Http2Pool

DEFAULT_IDLE_TIMEOUT = 4.0
SWEEP_INTERVAL = 0.5  # idle connections live at most their timeout plus this


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
        "express",
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
        self.exchange: Exchange | None = None
        self.reused = False
        self.answered = False  # a byte of the current request's response arrived
        self.idle_timeout = idle_timeout
        self.idle_since = 0.0
        self.protocol = "HTTP/1.1"
        self.express: Any = None  # the express request it carries (express.py), if any

    # ---- used by the exchange ------------------------------------------------

    def bind(self, exchange: Exchange) -> None:
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
        express = self.express
        if express is not None:
            if express.response(data):
                return
            express.materialize()
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
        downstream: Any = exchange.downstream if exchange is not None else None
        cork = getattr(downstream, "cork", None)
        if cork is None:
            self._dispatch(events)
            return
        # Head, body and end of a response read together leave in one send, not three.
        cork()
        try:
            self._dispatch(events)
        finally:
            downstream.uncork()

    @staticmethod
    def _forward_whole(exchange: Exchange, events: list) -> bool:
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
                exchange.response_trailers(event.headers)
            elif kind is ProtocolError:
                self._fail("UPE")
                return
            elif kind is Reset:
                self._fail("UC")
                return
            elif event is PAUSED:
                self.stream.pause_reading()

    def eof_received(self) -> None:
        self._settle()
        self._dispatch(self.codec.receive_eof())
        if self.exchange is not None:
            self._fail("UC")
        else:
            self._broken()

    def stream_failed(self, error: OSError) -> None:
        self._settle()
        self._fail("UC")

    def write_paused(self) -> None:
        self._settle()
        if self.exchange is not None:
            self.exchange.upstream_write_paused()

    def write_resumed(self) -> None:
        self._settle()
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


class _Attach:
    """A pending acquire: cancellable while the connect is in flight."""

    __slots__ = ("connect",)

    def __init__(self, connect: Connect | None) -> None:
        self.connect = connect

    def cancel(self) -> None:
        if self.connect is not None:
            self.connect.cancel()
            self.connect = None


_READY = _Attach(None)  # what a pooled connection's acquire returns: nothing to cancel


class UpstreamPool:
    """Idle keep-alive connections per endpoint, newest first (the warmest, least likely closed)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.idle: dict[Address, list[Http1Upstream]] = defaultdict(list)
        self._h2: Http2Pool | None = None
        self._sweeper = None

    @property
    def h2(self) -> Http2Pool:
        """The HTTP/2 upstream pool, made (and h2 imported) when a route first needs one."""
        if self._h2 is None:
            from pyproxy.http.upstream_h2 import Http2Pool

            self._h2 = Http2Pool(self.ctx)
        return self._h2

    def acquire(
        self, target: Address, source: str, cluster: Cluster | None, on_ready, on_failed
    ) -> _Attach:
        protocol = cluster.protocol if cluster is not None else self.ctx.settings.upstream_protocol
        if protocol == "http2":
            return self.h2.acquire(target, source, cluster, on_ready, on_failed)
        conn = self.take_idle(target)
        if conn is not None:
            on_ready(conn)
            return _READY
        ctx = self.ctx
        timeout = cluster.connect_timeout if cluster is not None else ctx.listener.connect_timeout
        idle_timeout = cluster.idle_timeout if cluster is not None else DEFAULT_IDLE_TIMEOUT
        attach = _Attach(None)

        def connected(sock: socket.socket) -> None:
            attach.connect = None
            on_ready(Http1Upstream(ctx, target, sock, idle_timeout))

        def failed(flag: str) -> None:
            attach.connect = None
            on_failed(flag)

        stage = ctx.connect_stage
        attach.connect = Connect(
            ctx.loop, target, timeout, connected, failed, source_host=source,
            block=ctx.block if ctx.timed else None, stage_ns=STAGE_NS + stage, stage_events=STAGE_EVENTS + stage,
        )  # fmt: skip
        return attach

    def release(self, conn: Any) -> None:
        """Take back an upstream: an HTTP/1 connection (pooled if reusable) or an HTTP/2 stream."""
        if conn.multiplexed:
            conn.release()
            return
        if conn.reusable():
            conn.park()
            self.keep(conn)
        else:
            conn.exchange = None
            conn.stream.close()

    def take_idle(self, target: Address) -> Http1Upstream | None:
        """The newest pooled connection to ``target`` still open (the warmest), or None."""
        idle = self.idle.get(target)
        while idle:
            conn = idle.pop()
            if not conn.stream.closed:
                return conn
        return None

    def keep(self, conn: Http1Upstream) -> None:
        """Pool a connection at rest: parked after an exchange, or back from the express lane."""
        conn.idle_since = self.ctx.loop.time()  # the sweeper closes it once idle too long
        self.idle[conn.key].append(conn)
        if self._sweeper is None:
            self._sweeper = self.ctx.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        """Close pooled connections idle past their timeout: one timer per pool, not one per request."""
        self._sweeper = None
        now = self.ctx.loop.time()
        for conns in self.idle.values():
            expired = [c for c in conns if now - c.idle_since >= c.idle_timeout]
            for conn in expired:
                conns.remove(conn)
                conn.stream.close()
        if any(self.idle.values()):
            self._sweeper = self.ctx.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def forget(self, conn: Http1Upstream) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close_idle(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._h2 is not None:
            self._h2.close_idle()
        for conns in self.idle.values():
            for conn in conns:
                conn.stream.close()
        self.idle.clear()
