"""An HTTP/2 downstream connection (h2c, prior knowledge): many streams, each one an Exchange.

Limits (RFC 9113 §10.5): streams past `max_concurrent_streams` are refused with
RST_STREAM REFUSED_STREAM (§5.1.2) rather than killing the connection; a
client that resets more than `rapid_reset_max` streams within
`rapid_reset_window` (CVE-2023-44487) gets GOAWAY ENHANCE_YOUR_CALM; a header
block that grows past `max_header_bytes` across CONTINUATION frames ends the
connection before more of it is buffered, a decoded one over the limit is
answered 431.

With the native HTTP/2 lane on (h2_lane.py), C carries some streams itself: they count against
the stream limit with the general path's, keep the connection from idling or closing while in
flight, and are handed to an Exchange here (adopt_request) when their answer is not plain.
"""

from __future__ import annotations

import socket
from time import perf_counter_ns
from typing import TYPE_CHECKING

from h2.events import (
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from pyproxy.addresses import Address
from pyproxy.codec.events import ProtocolError
from pyproxy.codec.http2 import (
    BODY_PROMISED,
    FIELD_REFUSED,
    h2_relayed_response_headers,
    h2_response_headers,
    h2_trailers,
    header_list_size,
    request_from_h2,
    response_has_body,
)
from pyproxy.codec.http2_native import fields_checked
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
from pyproxy.http.exchange import Exchange
from pyproxy.http.h2_session import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_GONE,
    H2Session,
    H2StreamBase,
)
from pyproxy.http.seams import H2Lane

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext

# h2 treats a stream past its own limit as a connection error; ours is enforced first, so h2's
# ceiling sits above it by what one read can open before we refuse (§5.1.2).
_H2_CEILING_SLACK = 4096


class Http2Downstream(H2Session):
    __slots__ = (
        "on_close",
        "target",
        "source",
        "protocol",
        "draining",
        "last_stream_id",
        "_timer",
        "_resets",
        "_reset_window_start",
        "_served",
        "lane",
        "_lane_served",
        "_idle_since",
    )

    def __init__(
        self, ctx: HttpContext, sock: socket.socket, on_close, target: Address, source: str
    ) -> None:
        super().__init__(ctx, client_side=False)
        self.attach_socket(sock, ctx.downstream_stages, DOWNSTREAM_RX, DOWNSTREAM_TX)
        self.on_close = on_close
        self.target, self.source = target, source
        self.protocol = "HTTP/2"
        self.draining = False
        self.last_stream_id = 0
        self._resets = 0
        self._reset_window_start = 0.0
        self._served = False
        self._idle_since = 0.0  # loop time the last stream ended (the idle clock's start)
        # Until the first request: the slowloris clock; later: the idle clock.
        self._timer = ctx.loop.call_later(ctx.settings.request_header_timeout, self._idle)
        lanes = ctx.h2_lanes
        self.lane: H2Lane | None = lanes.attach(self) if lanes is not None else None
        self._lane_served = 0  # the lane's count of answers when the idle clock last looked

    def start(self, preload: bytes = b"") -> None:
        limit = self.ctx.settings.max_concurrent_streams
        self.open(limit, limit + _H2_CEILING_SLACK)
        self.flush()
        if preload:
            self.data_received(preload)
        if not self.closed:
            self.stream.resume_reading()

    def data_received(self, data: bytes) -> None:
        lane = self.lane
        if lane is None:
            super().data_received(data)
            return
        lane.before_read(len(self.streams), self.draining)
        super().data_received(data)
        if not self.closed:
            lane.after_read()

    def lane_answered(self) -> None:
        """The lane submitted answers (or its watchdog looked): flush; a drain may be done."""
        self.mark_dirty()
        if self.draining:
            self._maybe_done()

    def _in_flight(self) -> int:
        lane = self.lane
        return len(self.streams) + (lane.in_flight if lane is not None else 0)

    # ---- events ------------------------------------------------------------------

    def handle(self, events: list) -> None:
        streams = self.streams
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if kind is DataReceived:
                self.data_event(event)
            elif kind is RequestReceived:
                self._request(event)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.request_ended()
            elif kind is TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is None or stream.exchange is None:
                    continue
                exchange = stream.exchange
                if stream.body_short():
                    self._malformed_body(stream)
                # Trailers need chunked framing on an HTTP/1.1 hop, not a Content-Length one; a
                # request that means to send them says so (Trailer) and goes chunked.
                elif exchange.request.chunked or getattr(exchange.upstream, "multiplexed", False):
                    exchange.request_trailers(event.headers)
            elif kind is StreamReset:
                self._stream_reset(event)
            elif kind is WindowUpdated:
                self.window_event(event)
            elif kind is RemoteSettingsChanged:
                self.pump_all()

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        ctx = self.ctx
        settings = ctx.settings
        if (
            self.draining and sid > self.last_stream_id
        ) or self._in_flight() >= settings.max_concurrent_streams:
            # §5.1.2 / §8.7: REFUSED_STREAM tells the client the request was not processed.
            self._reset_raw(sid, REFUSED_STREAM)
            return
        if not self.draining:
            self.last_stream_id = sid
        if not self._served:  # the first request stops the slowloris clock
            self._served = True
            self._cancel_timer()
        # Later ones leave the idle clock armed: it finds the connection busy when it fires.
        ended = event.stream_ended is not None
        headers = event.headers
        if (
            len(headers) > settings.max_headers
            or header_list_size(headers) > settings.max_header_bytes
        ):
            ctx.block[reject_slot("too_large")] += 1
            self._direct_reply(sid, 431, b"request header fields too large\n", ended)
            return
        head = request_from_h2(headers, ended, fields_checked(event))
        if isinstance(head, ProtocolError):
            if head.status == 501:
                ctx.block[reject_slot("method")] += 1
                self._direct_reply(sid, 501, (head.reason + "\n").encode(), ended)
            else:
                # §8.1.1: malformed, a stream error; nothing of it goes anywhere.
                reason = (
                    "header" if head.reason in (FIELD_REFUSED, BODY_PROMISED) else "pseudo_header"
                )
                ctx.block[reject_slot(reason)] += 1
                ctx.block[FLAG_BASE + FLAG_INDEX["DPE"]] += 1
                self._reset_raw(sid, PROTOCOL_ERROR)
            return
        stream = _DownstreamStream(self, sid)
        stream.expected_body = head.content_length
        self.streams[sid] = stream
        ctx.block[REQUESTS] += 1
        wants_trace = settings.server_timing or ctx.access_log is not None
        exchange = Exchange(ctx, stream, head, [0] * len(STAGES) if wants_trace else None)
        stream.exchange = exchange
        exchange.start()

    def _malformed_body(self, stream: _DownstreamStream) -> None:
        """A request whose body broke its Content-Length's promise: a stream error (§8.1.1),
        and the exchange ends as malformed (DPE), so what went upstream of it never ends as a
        request."""
        self.ctx.block[reject_slot("framing")] += 1
        stream.reset(PROTOCOL_ERROR)
        stream.exchange.request_malformed(0, b"")

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if event.remote_reset:
            loop_time = self.ctx.loop.time()
            settings = self.ctx.settings
            if loop_time - self._reset_window_start > settings.rapid_reset_window:
                self._reset_window_start = loop_time
                self._resets = 0
            self._resets += 1
            if self._resets > settings.rapid_reset_max:
                # CVE-2023-44487: resetting is free for the client, the work it started is not.
                if stream is not None:
                    stream.closed = True
                    self._abandon(stream)
                self.fail_connection(ENHANCE_YOUR_CALM, b"too many stream resets")
                return
        if stream is not None:
            stream.closed = True
            stream.ack()
            self._abandon(stream)
        self._maybe_done()

    def adopt_request(self, sid: int, head) -> Exchange:
        """A request the lane read whole and sent comes back before its answer: an Exchange on
        a stream of this session carries it on (Exchange.adopt_sent)."""
        stream = _DownstreamStream(self, sid)
        stream.ended_in = True
        self.streams[sid] = stream
        stream.exchange = exchange = Exchange(self.ctx, stream, head, None)
        return exchange

    def _abandon(self, stream: _DownstreamStream) -> None:
        exchange, stream.exchange = stream.exchange, None
        if exchange is not None:
            exchange.downstream_reset()

    def _reset_raw(self, sid: int, code: int) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except STREAM_GONE:
            pass
        self.mark_dirty()

    def _direct_reply(self, sid: int, status: int, body: bytes, ended: bool) -> None:
        """A reply made here, before any exchange exists (limits)."""
        block = self.ctx.block
        block[FLAG_BASE + FLAG_INDEX["DPE"]] += 1
        count_status(block, status)
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
        ]
        try:
            self.conn.send_headers(sid, headers)
            self.conn.send_data(sid, body, end_stream=True)
            if not ended:
                # §8.1: a complete response lets the server stop the upload with NO_ERROR.
                self.conn.reset_stream(sid, NO_ERROR)
        except STREAM_GONE:
            pass
        self.mark_dirty()
        self._maybe_done()

    # ---- stream bookkeeping --------------------------------------------------------

    def stream_finished(self, stream: _DownstreamStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._in_flight() or self.closed:
            return
        if self.draining:
            self.flush()
            self._close(after_flush=True)
        elif self._served:
            loop = self.ctx.loop
            self._idle_since = loop.time()
            if self._timer is None:
                self._timer = loop.call_later(self.ctx.settings.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self.streams or self.closed:
            return  # busy: _maybe_done arms the clock again once it is not
        if self._served:
            left = self._idle_since + self.ctx.settings.idle_timeout - self.ctx.loop.time()
            if left > 0:  # busy since the clock was armed, idle again for less than the timeout
                self._timer = self.ctx.loop.call_later(left, self._idle)
                return
        lane = self.lane
        if lane is not None:
            served = lane.state.served
            if lane.in_flight or served != self._lane_served:
                # The lane was busy since the clock last looked: the connection is not idle.
                self._lane_served = served
                self._served = True
                self._timer = self.ctx.loop.call_later(self.ctx.settings.idle_timeout, self._idle)
                return
            self.last_stream_id = max(self.last_stream_id, lane.state.last_sid)
        if not self._served:
            block = self.ctx.block
            block[FLAG_BASE + FLAG_INDEX["DT"]] += 1
        self.send_goaway(self.last_stream_id, NO_ERROR)
        self._close(after_flush=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- failures and endings ------------------------------------------------------------

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        # The client will open no more streams; those in flight finish (§6.8).
        self.draining = True
        self._maybe_done()

    def protocol_failed(self, exc: Exception | None) -> None:
        block = self.ctx.block
        block[FLAG_BASE + FLAG_INDEX["DPE"]] += 1
        # fail_connection (a flood or limit) calls with None; h2's own verdicts carry the exception.
        block[reject_slot("h2_protocol" if exc is not None else "h2_flood")] += 1
        self.flush()
        self._abandon_all()
        self._close(after_flush=True)

    def eof_received(self) -> None:
        self._abandon_all()
        self._close()

    def write_paused(self) -> None:
        # A client that does not read what it is sent (SETTINGS and PING acks included) is not
        # read from either: a control-frame flood would otherwise queue here without bound.
        super().write_paused()
        self.stream.pause_reading()

    def write_resumed(self) -> None:
        super().write_resumed()
        if not self.closed:
            self.stream.resume_reading()

    def stream_failed(self, error: OSError) -> None:
        self._abandon_all()
        self._close(reset=True)

    def _abandon_all(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.closed = True
            self._abandon(stream)

    def start_drain(self) -> None:
        """SIGTERM / drain_listeners: GOAWAY now (§6.8), let the streams in flight finish."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.last_stream_id = self.conn.highest_inbound_stream_id
        self.send_goaway(self.last_stream_id, NO_ERROR)
        self._maybe_done()

    def close(self, flag: str = "LR") -> None:
        """Drain deadline: abandon what is in flight."""
        had_streams = bool(self._in_flight())
        self._abandon_all()
        if not self.closed:
            self.send_goaway(self.last_stream_id, NO_ERROR)
        self._close(reset=had_streams)

    def _close(self, reset: bool = False, after_flush: bool = False) -> None:
        self._cancel_timer()
        if self.closed:
            return
        self.closed = True
        if self.lane is not None:
            self.lane.release_all()
        self.stream.close(reset=reset, after_flush=after_flush)
        self.on_close(self)


class _DownstreamStream(H2StreamBase):
    """The downstream an Exchange talks to: one HTTP/2 stream of an Http2Downstream."""

    __slots__ = ("done",)
    protocol = "HTTP/2"

    def __init__(self, session: Http2Downstream, stream_id: int) -> None:
        super().__init__(session, stream_id)
        self.done = False

    # ---- request side ----------------------------------------------------------

    def deliver(self, data) -> None:
        self.exchange.request_body(data)

    def request_ended(self) -> None:
        self.ended_in = True
        if self.exchange is not None:
            self.exchange.request_end()

    def pause_request(self) -> None:
        self.pause()

    def resume_request(self) -> None:
        self.resume()

    def default_target(self) -> tuple[Address, str]:
        return self.session.target, self.session.source

    # ---- response side (called by the exchange) ----------------------------------------

    def cork(self) -> None:
        """Nothing to do: the session's frames leave together at its next flush anyway."""

    def uncork(self) -> None:
        """See cork."""

    def send_whole(self, head, body) -> bool:
        """A whole HTTP/1 response, nothing to change: HEADERS, DATA and END_STREAM queued at
        once, one window check for all of it."""
        exchange = self.exchange
        if self.closed or exchange is None:
            return False
        has_body = response_has_body(exchange.request.method, head) and not _trailers_only(head)
        self._headers(h2_relayed_response_headers(head), not has_body)
        if not has_body:
            self.ended_out = True
            return True
        if body:
            self.chunks.append(body)
            self.queued += len(body)
        self.end_pending = True
        self.pump()
        return True

    def switch_to_tunnel(self, upstream) -> None:
        """HTTP/2 has no Upgrade (RFC 9113 §8.6): an upstream that switched anyway is dropped
        and the stream reset."""
        upstream.abort()
        self.exchange = None
        self.done = True
        self.reset(INTERNAL_ERROR)
        self.session.stream_finished(self)

    def signal_blocked(self, blocked: bool) -> None:
        if blocked:
            self.exchange.downstream_write_paused()
        else:
            self.exchange.downstream_write_resumed()

    def send_interim(self, head) -> None:
        if head.status == 101 or self.closed:
            return  # §8.6: no Upgrade in HTTP/2
        self._headers(h2_response_headers(head), False)

    def send_head(self, head) -> None:
        if self.closed:
            return
        exchange = self.exchange
        method = exchange.request.method if exchange is not None else b"GET"
        # A head carrying grpc-status is a gRPC trailers-only response: clients need it as one
        # HEADERS frame with END_STREAM, not HEADERS then an empty DATA frame ending the stream.
        has_body = response_has_body(method, head) and not _trailers_only(head)
        self._headers(h2_response_headers(head), not has_body)
        if not has_body:
            self.ended_out = True

    def _headers(self, headers, end_stream: bool) -> None:
        session = self.session
        t0 = perf_counter_ns()
        try:
            session.conn.send_headers(self.stream_id, headers, end_stream=end_stream)
        except STREAM_GONE:
            self.closed = True
        self.account(t0)
        session.mark_dirty()

    def send_body(self, data) -> None:
        self.queue_data(data)

    def send_trailers(self, headers) -> None:
        self.queue_end(h2_trailers(headers))

    def send_end(self) -> None:
        self.queue_end(None)

    def exchange_done(self, exchange, reset: bool = False) -> None:
        self.exchange = None
        self.done = True
        if reset:
            self.reset(INTERNAL_ERROR)
            self.session.stream_finished(self)
        elif self.ended_out or self.closed:
            self.sent_all()

    def sent_all(self) -> None:
        if not self.done:
            return
        if not self.ended_in and not self.closed:
            # §8.1: the response is complete; stop the rest of the upload without an error.
            self.reset(NO_ERROR)
        self.ack()
        self.session.stream_finished(self)

    def peer_gone(self) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.downstream_reset()
        self.session.stream_finished(self)


def _trailers_only(head) -> bool:
    for name, _ in head.headers:
        if name == b"grpc-status":
            return True
    return False
