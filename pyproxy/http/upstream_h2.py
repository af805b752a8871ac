"""HTTP/2 upstream connections (h2c, prior knowledge) that multiplex exchanges, and their pool.

A connection hands out streams while it has room under the peer's
SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 §5.1.2; 100 assumed until the
peer's SETTINGS arrive); when every connection to an endpoint is full the
pool opens another. A GOAWAY stops new streams on that connection; streams
above its last-stream-id were not processed and fail retryably (§6.8, §8.7).
"""

from __future__ import annotations

import socket
from collections import defaultdict
from time import perf_counter_ns
from typing import TYPE_CHECKING

from h2.events import (
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error

from pyproxy.addresses import Address
from pyproxy.codec.events import END, Body, RequestHead, Trailers
from pyproxy.codec.http2 import (
    h2_request_headers,
    h2_trailers,
    response_from_h2,
    response_has_body,
    wants_trailers,
)
from pyproxy.codec.http2_native import fields_checked
from pyproxy.counters import UPSTREAM_RX, UPSTREAM_TX
from pyproxy.http.h2_session import (
    CANCEL,
    DEFAULT_PEER_STREAMS,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Session,
    H2StreamBase,
)
from pyproxy.http.router import connection_timeouts
from pyproxy.io.connector import Connect

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.router import Cluster


class Http2Upstream(H2Session):
    __slots__ = (
        "pool",
        "key",
        "idle_timeout",
        "waiting",
        "reserved",
        "settings_known",
        "accepting",
        "used",
        "connect",
        "route",
        "_idle_timer",
        "_idle_since",
    )

    def __init__(self, ctx: HttpContext, pool: Http2Pool, key: Address, idle_timeout: float):
        super().__init__(ctx, client_side=True)
        self.pool = pool
        self.key = key
        self.idle_timeout = idle_timeout
        # (stream, on_ready, on_failed, attach) until the peer's SETTINGS tell its stream limit.
        self.waiting: list = []
        self.route: tuple = ()  # (source, cluster), to place streams the peer has no room for
        self.reserved = 0  # streams handed out and not yet released
        self.settings_known = False
        self.accepting = True
        self.used = False
        self.connect: Connect | None = None
        self._idle_timer = None
        self._idle_since = 0.0  # loop time the connection last went idle (no stream reserved)

    def capacity(self) -> int:
        if self.settings_known:
            limit = self.conn.remote_settings.max_concurrent_streams
        else:
            limit = DEFAULT_PEER_STREAMS
        return limit - self.reserved

    def open_stream(self, on_ready, on_failed):
        stream = Http2UpstreamStream(self)
        self.reserved += 1  # the idle timer, if armed, finds the connection busy when it fires
        if self.settings_known:
            on_ready(stream)
            return _NO_ATTACH
        attach = _WaitingAttach(self, stream)
        self.waiting.append((stream, on_ready, on_failed, attach))
        return attach

    def start_connect(self, source: str, timeout: float) -> None:
        self.connect = self.ctx.connect(
            self.key, timeout, self._connected, self._connect_failed, source
        )

    def _connected(self, sock: socket.socket) -> None:
        self.connect = None
        self.attach_socket(sock, self.ctx.upstream_stages, UPSTREAM_RX, UPSTREAM_TX)
        limit = self.ctx.settings.max_concurrent_streams
        self.open(limit, limit)
        self.flush()
        self.stream.resume_reading()

    def _settings_arrived(self) -> None:
        """The peer's limit is known (§6.5.2): start what fits, place the rest elsewhere."""
        self.settings_known = True
        waiting, self.waiting = self.waiting, []
        room = self.conn.remote_settings.max_concurrent_streams - (self.reserved - len(waiting))
        for stream, on_ready, _failed, _attach in waiting[:room]:
            on_ready(stream)
        for _stream, on_ready, on_failed, attach in waiting[room:]:
            self.reserved -= 1
            source, cluster = self.route
            attach.inner = self.pool.acquire(self.key, source, cluster, on_ready, on_failed)
        self._maybe_idle()

    def _connect_failed(self, flag: str) -> None:
        self.connect = None
        self.closed = True
        self.pool.forget(self)
        waiting, self.waiting = self.waiting, []
        for _stream, _ready, on_failed, _attach in waiting:
            on_failed(flag)

    def cancel_waiting(self, stream: Http2UpstreamStream) -> None:
        for i, item in enumerate(self.waiting):
            if item[0] is stream:
                del self.waiting[i]
                self.reserved -= 1
                break
        if not self.waiting and self.connect is not None and not self.reserved:
            self.connect.cancel()
            self.connect = None
            self.closed = True
            self.pool.forget(self)

    # ---- events ------------------------------------------------------------------

    def handle(self, events: list) -> None:
        streams = self.streams
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if kind is DataReceived:
                self.data_event(event)
            elif kind is ResponseReceived or kind is InformationalResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None and stream.exchange is not None:
                    head = response_from_h2(event.headers, fields_checked(event))
                    if head is None:  # malformed: a stream error (RFC 9113 §8.1.1)
                        stream.reset(PROTOCOL_ERROR)
                        stream.fail("UPE")
                    else:
                        length = head.content_length  # most responses have none: no look
                        if length and response_has_body(stream.exchange.request.method, head):
                            stream.expected_body = length
                        stream.exchange.response_head(head)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended_in = True
                    if stream.exchange is not None:
                        stream.exchange.response_end()
            elif kind is TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    # Trailers end the stream (§8.1): the exchange may release it at once, and a
                    # stream ended both ways is not cancelled.
                    stream.ended_in = True
                    if stream.body_short():  # malformed (§8.1.1): the body goes no further
                        stream.reset(PROTOCOL_ERROR)
                        stream.fail("UPE")
                    elif stream.exchange is not None:
                        stream.exchange.response_trailers(event.headers)
            elif kind is StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.closed = True
                    if event.error_code == REFUSED_STREAM:
                        stream.reused = True  # §8.7: not processed, safe to retry
                    stream.fail("UC")
            elif kind is WindowUpdated:
                self.window_event(event)
            elif kind is RemoteSettingsChanged:
                if not self.settings_known:
                    self._settings_arrived()
                self.pump_all()

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        self.accepting = False
        self.pool.forget(self)
        for sid, stream in list(self.streams.items()):
            if sid > last_stream_id:
                stream.reused = True  # §6.8: never processed, safe to retry elsewhere
                stream.closed = True
                stream.fail("UC")
        self.stream_released()

    def protocol_failed(self, exc: Exception | None) -> None:
        self.flush()
        self._fail_all("UPE", reset=False)

    def eof_received(self) -> None:
        self._fail_all("UC", reset=False)

    def stream_failed(self, error: OSError) -> None:
        self._fail_all("UC", reset=True)

    def _fail_all(self, flag: str, reset: bool) -> None:
        self.accepting = False
        self.pool.forget(self)
        self._close(reset)
        for stream in list(self.streams.values()):
            stream.closed = True
            stream.fail(flag)

    # ---- idle and close ------------------------------------------------------------

    def stream_released(self) -> None:
        self.used = True
        if self.reserved:
            return
        if not self.accepting:
            self.flush()
            self._close(False)
        else:
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        """Idle from now: one timer per idle period, not an arm and a cancel per stream."""
        if not self.reserved and not self.closed:
            loop = self.ctx.loop
            self._idle_since = loop.time()
            if self._idle_timer is None:
                self._idle_timer = loop.call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """The idle timer: close if idle for the whole timeout, else look again when it may be."""
        self._idle_timer = None
        if self.reserved or self.closed:
            return  # busy: _maybe_idle arms it again once the streams are released
        left = self._idle_since + self.idle_timeout - self.ctx.loop.time()
        if left > 0:
            self._idle_timer = self.ctx.loop.call_later(left, self._idle_check)
            return
        self.close_idle()

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_idle(self) -> None:
        self._cancel_idle()  # called by the pool's drain too, with the idle timer armed
        if self.reserved or self.closed:
            return
        self.accepting = False
        self.pool.forget(self)
        if self.stream is not None:
            self.send_goaway(0, NO_ERROR)
        self._close(False)

    def _close(self, reset: bool) -> None:
        self._cancel_idle()
        if self.connect is not None:
            self.connect.cancel()
            self.connect = None
        if self.closed:
            return
        self.closed = True
        if self.stream is not None:
            if reset:
                self.stream.close(reset=True)
            else:
                self.stream.close_after_flush()


class Http2UpstreamStream(H2StreamBase):
    """What an Exchange binds as its upstream: one stream on a shared Http2Upstream."""

    __slots__ = ("reused", "released")
    multiplexed = True
    protocol = "HTTP/2"

    def __init__(self, session: Http2Upstream) -> None:
        super().__init__(session, None)
        self.reused = session.used
        self.released = False

    @property
    def retry_safe(self) -> bool:
        """Refused (§8.7), above a GOAWAY's last stream (§6.8), or on a pooled session that went
        away before answering: the request was not processed."""
        return self.reused

    # ---- used by the exchange ------------------------------------------------------

    def bind(self, exchange) -> None:
        self.exchange = exchange

    def send(self, event) -> None:
        if self.closed:
            return
        kind = type(event)
        if kind is Body:
            self.queue_data(event.data)
        elif event is END:
            self.queue_end(None)
        elif kind is Trailers:
            self.queue_end(h2_trailers(event.headers))
        elif kind is RequestHead:
            self._open(event)

    def send_whole(self, head: RequestHead) -> None:
        """A bodyless request (its HEADERS frame carries END_STREAM)."""
        self.send(head)
        self.send(END)

    def _open(self, head: RequestHead) -> None:
        session = self.session
        conn = session.conn
        exchange = self.exchange
        te = exchange is not None and wants_trailers(exchange.request.headers)
        headers, has_body = h2_request_headers(head, te)
        t0 = perf_counter_ns()
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=not has_body)
        except H2Error:
            # The peer lowered its stream limit below what is open, or ids ran out.
            self.account(t0)
            self.closed = True
            session.ctx.loop.call_soon(self.fail, "UC")
            return
        self.account(t0)
        self.stream_id = sid
        session.streams[sid] = self
        if not has_body:
            self.ended_out = True
        session.mark_dirty()

    def pause_response(self) -> None:
        self.pause()

    def resume_response(self) -> None:
        self.resume()

    def abort(self) -> None:
        self.exchange = None
        if not (self.ended_in and self.ended_out):
            self.reset(CANCEL)
        self.release()

    def release(self) -> None:
        """Back to the pool (the exchange is over); the connection stays shared."""
        if self.released:
            return
        self.exchange = None
        if not self.closed and not (self.ended_in and self.ended_out):
            self.reset(CANCEL)
        self.ack()
        self.released = True
        session = self.session
        if self.stream_id is not None and session.streams.get(self.stream_id) is self:
            del session.streams[self.stream_id]
        session.reserved -= 1
        session.stream_released()

    def fail(self, flag: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.closed = True
        self.release()
        if exchange is not None:
            exchange.upstream_failed(flag)

    # ---- H2StreamBase --------------------------------------------------------------

    def deliver(self, data) -> None:
        self.exchange.response_body(data)

    def signal_blocked(self, blocked: bool) -> None:
        if blocked:
            self.exchange.upstream_write_paused()
        else:
            self.exchange.upstream_write_resumed()

    def sent_all(self) -> None:
        pass  # the request is out; the stream lives until the response ends

    def peer_gone(self) -> None:
        self.closed = True
        self.fail("UC")


class _NoAttach:
    __slots__ = ()

    def cancel(self) -> None:
        pass


_NO_ATTACH = _NoAttach()


class _WaitingAttach:
    """A stream promised on a connection still connecting: cancellable (Exchange.attach)."""

    __slots__ = ("conn", "stream", "inner")

    def __init__(self, conn: Http2Upstream, stream: Http2UpstreamStream) -> None:
        self.conn = conn
        self.stream = stream
        self.inner = None  # where the stream went when this connection had no room

    def cancel(self) -> None:
        if self.inner is not None:
            self.inner.cancel()
        else:
            self.conn.cancel_waiting(self.stream)


class Http2Pool:
    """Shared HTTP/2 connections per endpoint; a new one only when all are full or going away."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.conns: dict[Address, list[Http2Upstream]] = defaultdict(list)

    def acquire(self, target: Address, source: str, cluster: Cluster | None, on_ready, on_failed):
        conns = self.conns[target]
        for conn in conns:
            if conn.accepting and not conn.closed and conn.capacity() > 0:
                return conn.open_stream(on_ready, on_failed)
        ctx = self.ctx
        timeout, idle_timeout = connection_timeouts(cluster, ctx.listener.connect_timeout)
        conn = Http2Upstream(ctx, self, target, idle_timeout)
        conn.route = (source, cluster)
        conns.append(conn)
        attach = conn.open_stream(on_ready, on_failed)
        conn.start_connect(source, timeout)
        return attach

    def forget(self, conn: Http2Upstream) -> None:
        conns = self.conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_idle(self) -> None:
        for conns in list(self.conns.values()):
            for conn in list(conns):
                if not conn.reserved:
                    conn.close_idle()
