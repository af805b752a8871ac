"""What HTTP/2 downstream and upstream connections share: an h2 state machine over a Stream, timed as
`parse`, flushed once per read, and per-stream send queues that wait for flow-control credit.

Backpressure across the proxy (RFC 9113 §5.2): received DATA is acknowledged
(WINDOW_UPDATE) only once the other side of the exchange took it without
asking us to pause, so a slow reader on one side stops the writer on the
other after one window, not after the whole body.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings

from pyproxy.codec import http2_native
from pyproxy.codec.http2 import FrameScanner, HeaderBlockTooLarge, goaway_frame, parse_goaway
from pyproxy.counters import LANE_READS_PYTHON
from pyproxy.io.stream import Stream

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext

# Per-stream h2 calls can race a peer's RST_STREAM already processed: the stream is just gone.
STREAM_GONE = (StreamClosedError, H2ProtocolError, KeyError)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = (
    0x0, 0x1, 0x2, 0x7, 0x8, 0xB,
)  # fmt: skip
DEFAULT_PEER_STREAMS = 100  # assumed until the peer's SETTINGS arrive (RFC 9113 §6.5.2 advice)


class FlushQueue:
    """Sessions written to during one callback get a single data_to_send() flush at its end.

    While one read's events are handled (``batching``), the streams they queue DATA or an end
    on are pumped once after the last event rather than at each queueing (a gRPC call's body
    and END_STREAM, or a response's body and trailers, then leave in one window check and one
    codec call), and what the read received is acknowledged after those pumps, so a stream
    whose other side turned out blocked is paused before it could give its window back
    (the module doc's rule holds across the batch).
    """

    __slots__ = ("loop", "dirty", "scheduled", "reading", "batching", "pumps", "acks")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.dirty: list[H2Session] = []
        self.scheduled = False
        self.reading = False  # an HTTP/2 read is being handled: it flushes at its end
        self.batching = False
        self.pumps: list[H2StreamBase] = []
        self.acks: list[H2StreamBase] = []

    def add(self, session: H2Session) -> None:
        if session.dirty:
            return
        session.dirty = True
        self.dirty.append(session)
        if not self.scheduled and not self.reading:
            # Writes caused by an HTTP/1 read (no HTTP/2 read to flush at the end of).
            self.scheduled = True
            self.loop.call_soon(self.run)

    def handle(self, session: H2Session, events: list) -> None:
        """One read's events, then the pumps and acknowledgements they deferred."""
        if self.batching:  # a read inside a read's handling: its work joins the outer batch
            session.handle(events)
            return
        self.batching = True
        try:
            session.handle(events)
        finally:
            # Even after a failed event: what the others queued must not wait for another read.
            self.batching = False
            self._settle()

    def _settle(self) -> None:
        pumps, acks = self.pumps, self.acks
        # Pumps may queue more (a stream done frees its exchange's next step): not deferred now.
        for stream in pumps:
            stream.pump_pending = False
            stream.pump()
        pumps.clear()
        for stream in acks:
            stream.ack_pending = False
            if not stream.paused:
                stream.ack()
        acks.clear()

    def run(self) -> None:
        self.scheduled = False
        dirty = self.dirty
        for _ in range(64):  # a flush may dirty another session (pause signals): bounded rounds
            if not dirty:
                return
            sessions = dirty[:]
            dirty.clear()
            for session in sessions:
                if session.dirty:
                    session.flush()


def flush_queue(ctx: HttpContext) -> FlushQueue:
    """One queue per listener context (a context belongs to one worker loop)."""
    queue = getattr(ctx, "h2_flushes", None)
    if queue is None:
        queue = ctx.h2_flushes = FlushQueue(ctx.loop)
    return queue


class H2Session:
    """One HTTP/2 connection. Subclasses handle events (`handle`) and failures."""

    __slots__ = (
        "ctx",
        "conn",
        "stream",
        "scanner",
        "streams",
        "flushes",
        "dirty",
        "closed",
        "write_blocked",
        "parse_ns",
        "parse_events",
        "timed",
        "native",
        "stalled",
        "carrier",
    )

    def __init__(self, ctx: HttpContext, client_side: bool) -> None:
        self.ctx = ctx
        self.timed = ctx.timed
        settings = ctx.settings
        limit = settings.max_header_bytes
        # The scanner runs before either codec: header-block bytes and GOAWAY are the proxy's.
        native = http2_native.effective_codec(settings.http2_codec) == "native"
        scan = http2_native.lib.pp_h2_scan if native else None
        self.scanner = FrameScanner(limit, server=not client_side, scan=scan)
        if native:
            # nghttp2's own rapid-reset bucket stays above the proxy's, which counts and flags.
            burst = min(settings.rapid_reset_max * 2 + 1000, 0xFFFFFFFF)
            self.conn: Any = http2_native.NativeH2Connection(client_side, burst)
        else:
            self.conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
            # hpack's own ceiling stops a compression bomb while decoding; between our limit
            # and this, the request is decoded (HPACK state must stay in sync, §4.3) and
            # answered 431.
            self.conn.decoder.max_header_list_size = 4 * limit + 32 * settings.max_headers
        self.native = type(self.conn) is http2_native.NativeH2Connection
        # Streams whose pump left DATA or an end waiting for flow-control credit (a superset:
        # pruned before each read). With none, the native codec makes no WINDOW_UPDATE event.
        self.stalled: set[H2StreamBase] = set()
        # A native lane that takes whole reads of this session in one crossing (GrpcLane.carry).
        self.carrier: Any = None
        self.stream: Any = None  # the Stream, once attach_socket() ran
        self.streams: dict = {}
        self.flushes = flush_queue(ctx)
        self.dirty = False
        self.closed = False
        self.write_blocked = False
        self.parse_ns, self.parse_events = ctx.parse_ns, ctx.parse_events

    def attach_socket(self, sock, stages: tuple[int, int], rx: int, tx: int) -> None:
        ctx = self.ctx
        # The subclasses (downstream/upstream sessions) are the StreamOwner.
        owner: Any = self
        self.stream = Stream(
            ctx.loop, sock, ctx.block, owner, timed=ctx.timed, read_stage=stages[0],
            write_stage=stages[1], rx_slot=rx, tx_slot=tx, claim_end=ctx.claim_end,
        )  # fmt: skip

    def open(self, max_streams: int, enforced_streams: int) -> None:
        """Send our preface + SETTINGS; never open a window wider than configured (§6.9)."""
        settings = self.ctx.settings
        conn = self.conn
        if type(conn) is http2_native.NativeH2Connection:
            self._open_native(conn, max_streams)
            return
        client = conn.config.client_side
        values = {
            SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
        }
        if client:
            values[SettingCodes.ENABLE_PUSH] = 0  # §8.4: a proxy has no use for pushes
        conn.local_settings = Settings(client=client, initial_values=values)
        t0 = perf_counter_ns()
        conn.initiate_connection()
        if settings.connection_window > 65535:
            conn.increment_flow_control_window(settings.connection_window - 65535)
        if enforced_streams != max_streams:
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = enforced_streams
            conn.local_settings = Settings(client=client, initial_values=values)
        self.account(perf_counter_ns() - t0, None)
        self.mark_dirty()

    def _open_native(self, conn: http2_native.NativeH2Connection, max_streams: int) -> None:
        settings = self.ctx.settings
        values = {
            http2_native.MAX_CONCURRENT_STREAMS: max_streams,
            http2_native.INITIAL_WINDOW_SIZE: settings.stream_window,
            http2_native.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
        }
        if conn.client_side:
            values[http2_native.ENABLE_PUSH] = 0
        t0 = perf_counter_ns()
        conn.initiate(values, settings.connection_window)
        self.account(perf_counter_ns() - t0, None)
        self.mark_dirty()

    # ---- timing ------------------------------------------------------------------

    def account(self, elapsed: int, trace: list[int] | None) -> None:
        if self.timed:
            self.ctx.account_parse(elapsed, trace)

    # ---- bytes in ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        flushes = self.flushes
        if flushes.reading:
            self._received(data)
            return
        flushes.reading = True
        try:
            self._received(data)
        finally:
            flushes.reading = False
            if flushes.dirty and not flushes.scheduled:  # a read that ended early (a failure)
                flushes.scheduled = True
                flushes.loop.call_soon(flushes.run)

    def _received(self, data: bytes) -> None:
        """One read: its events handled, then every session it wrote to flushed."""
        t0 = perf_counter_ns()
        carried = None  # pp_glane_recv's result, when a lane ran the codec over the read
        if self.native:
            stalled = self.stalled
            if stalled:
                for stream in [s for s in stalled if not s.waits()]:
                    stalled.discard(stream)
            self.conn.window_events = bool(stalled)
            carrier = self.carrier
            if carrier is not None:
                if not stalled and self.scanner.passes(data):
                    carried = carrier.carry(self, data, t0)
                    if carried is None:  # the lane took all of it and wrote what it owed
                        return
                self.ctx.block[LANE_READS_PYTHON] += 1
        goaways: Sequence[bytes] = ()  # the scanner lifts GOAWAYs out; a carried read has none
        try:
            if carried is not None:
                events = self.conn.received(carried)
            else:
                data, goaways = self.scanner.feed(data)
                events = self.conn.receive_data(data) if data else []
        except HeaderBlockTooLarge:
            self.account(perf_counter_ns() - t0, None)
            self.fail_connection(ENHANCE_YOUR_CALM, b"header block too large")
            return
        except H2ProtocolError as exc:
            self.account(perf_counter_ns() - t0, None)
            self.protocol_failed(exc)  # h2 queued its GOAWAY already
            return
        self.account(perf_counter_ns() - t0, None)
        self.wrote()
        if events:
            self.flushes.handle(self, events)
        for payload in goaways:
            if self.closed:
                break
            self.goaway_received(*parse_goaway(payload))
        self.flushes.run()
        if self.dirty:
            self.flush()

    # ---- bytes out -------------------------------------------------------------------

    def mark_dirty(self) -> None:
        if not self.dirty and not self.closed:
            self.flushes.add(self)

    def wrote(self) -> None:
        """After a read or an acknowledgement: flush if the codec may have something to send.
        The native codec knows (a WINDOW_UPDATE goes only once half a window is consumed);
        with h2, assume so."""
        if not self.native or self.conn.output_pending:
            self.mark_dirty()

    def flush(self) -> None:
        self.dirty = False
        if self.closed:
            return
        t0 = perf_counter_ns()
        data = self.conn.data_to_send()
        self.account(perf_counter_ns() - t0, None)
        if data:
            self.stream.write(data)

    def send_goaway(self, last_stream_id: int, error_code: int) -> None:
        """GOAWAY without telling h2: its state machine would refuse the in-flight streams after."""
        self.flush()
        if not self.closed:
            self.stream.write(goaway_frame(last_stream_id, error_code))

    def fail_connection(self, error_code: int, reason: bytes) -> None:
        """A connection error (§5.4.1): GOAWAY through h2, then close once it is written."""
        try:
            self.conn.close_connection(error_code, additional_data=reason)
        except H2ProtocolError:
            pass
        self.protocol_failed(None)

    # ---- StreamOwner -------------------------------------------------------------

    def write_paused(self) -> None:
        self.write_blocked = True
        for stream in list(self.streams.values()):
            stream.update_blocked()

    def write_resumed(self) -> None:
        self.write_blocked = False
        for stream in list(self.streams.values()):
            stream.update_blocked()

    # Events both sides handle alike (the subclasses' `handle` dispatches the rest).
    def data_event(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.exchange is not None:
            stream.received(event.data, event.flow_controlled_length)
        else:
            discard(self, event.stream_id, event.flow_controlled_length)

    def window_event(self, event) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.pump()
        else:
            self.pump_all()

    def pump_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.pump()

    # ---- for subclasses --------------------------------------------------------------

    def handle(self, events: list) -> None:
        raise NotImplementedError

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        raise NotImplementedError

    def protocol_failed(self, exc: Exception | None) -> None:
        raise NotImplementedError


class H2StreamBase:
    """One stream's two directions: a send queue waiting for window, and acknowledgement of what
    was received once the other side took it."""

    __slots__ = (
        "session",
        "stream_id",
        "exchange",
        "chunks",
        "queued",
        "end_pending",
        "trailers",
        "ended_out",
        "ended_in",
        "paused",
        "unacked",
        "signalled",
        "closed",
        "pump_pending",
        "ack_pending",
        "expected_body",
        "body_in",
    )

    def __init__(self, session: Any, stream_id: int | None) -> None:
        # `session` is a downstream or upstream subclass of H2Session; its stream-lifecycle
        # methods (stream_finished, stream_released, ...) live there.
        self.session = session
        self.stream_id: Any = stream_id  # None until an upstream stream is opened
        self.exchange: Any = None
        self.chunks: deque = deque()
        self.queued = 0
        self.end_pending = False
        self.trailers = None
        self.ended_out = False  # END_STREAM sent
        self.ended_in = False  # END_STREAM received
        self.paused = False  # the other side asked us to stop acknowledging
        self.unacked = 0
        self.signalled = False  # we told the other side to pause
        self.closed = False
        self.pump_pending = False  # in the read batch's pumps (FlushQueue.handle)
        self.ack_pending = False  # in the read batch's acknowledgements
        self.expected_body: int | None = None  # the head's Content-Length, where it binds
        self.body_in = 0  # DATA bytes received

    # ---- sending ---------------------------------------------------------------

    def queue_data(self, data) -> None:
        if self.ended_out or self.closed or not data:
            return
        self.chunks.append(data)
        self.queued += len(data)
        self._pump_soon()

    def queue_end(self, trailers) -> None:
        if self.ended_out or self.closed or self.end_pending:
            return
        self.end_pending = True
        self.trailers = trailers or None
        self._pump_soon()

    def _pump_soon(self) -> None:
        """Pump now, or once after the read being handled (FlushQueue.handle)."""
        flushes = self.session.flushes
        if not flushes.batching:
            self.pump()
        elif not self.pump_pending:
            self.pump_pending = True
            flushes.pumps.append(self)

    def pump(self) -> None:
        """Send what the peer's windows allow (§6.9.1); the rest waits for WINDOW_UPDATE."""
        sid = self.stream_id
        if sid is None or self.closed or self.ended_out or not (self.chunks or self.end_pending):
            return  # nothing waits (a connection-wide WINDOW_UPDATE pumps every stream)
        session = self.session
        conn = session.conn
        chunks = self.chunks
        t0 = perf_counter_ns()
        try:
            while chunks:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                size = min(window, conn.max_outbound_frame_size)
                chunk = chunks[0]
                if len(chunk) <= size:
                    chunks.popleft()
                    self.queued -= len(chunk)
                    # The last chunk carries END_STREAM itself: no empty DATA frame after it.
                    last = not chunks and self.end_pending and self.trailers is None
                    conn.send_data(sid, chunk, end_stream=last)
                    self.ended_out = last
                else:
                    view = memoryview(chunk)
                    conn.send_data(sid, view[:size])
                    chunks[0] = view[size:]
                    self.queued -= size
            if not chunks and self.end_pending and not self.ended_out:
                if self.trailers is not None:
                    conn.send_headers(sid, self.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                self.ended_out = True
        except STREAM_GONE:
            self.account(t0)
            session.mark_dirty()
            self.peer_gone()
            return
        self.account(t0)
        session.mark_dirty()
        if self.ended_out:
            self.sent_all()
        else:
            if chunks or self.end_pending:  # the window ran out first: a WINDOW_UPDATE matters
                session.stalled.add(self)
            self.update_blocked()

    def waits(self) -> bool:
        """Has this stream DATA or an end that waits for flow-control credit?"""
        return not (self.closed or self.ended_out) and bool(self.chunks or self.end_pending)

    def account(self, t0: int) -> None:
        session = self.session
        if session.timed:  # straight to the context: one call less on every codec step
            exchange = self.exchange
            session.ctx.account_parse(
                perf_counter_ns() - t0, exchange.trace if exchange is not None else None
            )

    def update_blocked(self) -> None:
        blocked = (self.queued > 0 or self.session.write_blocked) and not self.closed
        if blocked != self.signalled:
            self.signalled = blocked
            if self.exchange is not None:
                self.signal_blocked(blocked)

    def reset(self, error_code: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.chunks.clear()
        self.queued = 0
        if self.stream_id is not None:
            t0 = perf_counter_ns()
            try:
                self.session.conn.reset_stream(self.stream_id, error_code)
            except STREAM_GONE:
                pass
            self.account(t0)
            self.ack()
            self.session.mark_dirty()

    # ---- receiving -------------------------------------------------------------

    def received(self, data, flow_controlled_length: int) -> None:
        self.unacked += flow_controlled_length
        self.body_in += len(data)
        self.deliver(data)
        if self.paused:
            return
        flushes = self.session.flushes
        if not flushes.batching:
            self.ack()
        elif not self.ack_pending:  # after the batch's pumps: the other side may block yet
            self.ack_pending = True
            flushes.acks.append(self)

    def body_short(self) -> bool:
        """Trailers end the stream: did its DATA carry less than the head's Content-Length
        promised (malformed, §8.1.1)? Both codecs judge a body that ends with DATA, and one
        longer than promised; neither judges one that ends with trailers."""
        expected = self.expected_body
        return expected is not None and self.body_in < expected

    def ack(self) -> None:
        n = self.unacked
        if not n:
            return
        self.unacked = 0
        t0 = perf_counter_ns()
        try:
            self.session.conn.acknowledge_received_data(n, self.stream_id)
        except STREAM_GONE:
            pass
        self.account(t0)
        self.session.wrote()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.ack()

    # ---- for subclasses ----------------------------------------------------------

    def deliver(self, data) -> None:
        raise NotImplementedError

    def signal_blocked(self, blocked: bool) -> None:
        raise NotImplementedError

    def sent_all(self) -> None:
        raise NotImplementedError

    def peer_gone(self) -> None:
        raise NotImplementedError


def discard(session: H2Session, stream_id: int, flow_controlled_length: int) -> None:
    """DATA for a stream nobody reads any more: give the window back at once."""
    try:
        session.conn.acknowledge_received_data(flow_controlled_length, stream_id)
    except STREAM_GONE:
        pass
    session.wrote()
