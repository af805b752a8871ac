"""The native gRPC lane: an h2c downstream's unary-shaped gRPC calls carried to an h2c upstream in C.

On a gRPC listener whose calls all take one route to one endpoint with no filter (the rule
every native lane follows, native_lane.sole_route), on the native HTTP/2 codec, and with
``grpc_lane: true``, each downstream connection gets a ``GrpcLane`` and, once it has a call
to carry, one upstream HTTP/2 connection of its own (``GrpcLaneUpstream``). C
(native/grpc_lane.c) takes, after each downstream read, every call whose request (plain head,
whole gRPC-framed body up to one window, END_STREAM) came whole in that read, re-encodes it by
upstream_h2's rules and submits it on that connection; after each upstream read it answers
every such call whose response came whole and plain. No Exchange, event or header list is
made in Python for those calls: Python runs once per read (a read the lane takes whole goes
into the codec and out to both sockets in one crossing, GrpcLane.carry), and accounts a
connection's first finished call of each method from a small record; C counts the later ones
itself in the same slots (pp_glane_learn; the listener's counters are kept in C).

Every other stream is the general path's, untouched, before a byte of it went upstream. A
call the lane took whose response is anything else (a reset, a response in pieces, a status
or framing the general path must judge, a lost connection, GOAWAY, a deadline) is handed
over: an Exchange adopts the already-sent upstream stream (Exchange.adopt_call) before its
records are read, so what follows is the general path's, and the request is never sent again.
"""

from __future__ import annotations

import struct
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from pyproxy.codec.grpc import CANCELLED, STATUS_NAMES, UNKNOWN, method_of
from pyproxy.config import ListenerConfig, ListenerMode
from pyproxy.counters import (
    EXPRESS_REQUESTS,
    FLAG_BASE,
    FLAG_INDEX,
    LANE_READS_WHOLE,
    NATIVE_REQUESTS,
    REQUESTS,
)
from pyproxy.grpc_metrics import (
    E_STARTED,
    E_STATUS,
    HIST,
    HIST_COUNT,
    HIST_SUM_NS,
    MSG_RECEIVED,
    MSG_SENT,
    OTHER_ENTRY,
    record_finished,
)
from pyproxy.http.grpc_call import method_table
from pyproxy.http.h2_lane import LaneState
from pyproxy.http.h2_session import NO_ERROR
from pyproxy.http.router import connection_timeouts, sole_route
from pyproxy.http.upstream_h2 import Http2Upstream, Http2UpstreamStream
from pyproxy.native import block_pointer, effective_http2_codec, native_extension

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.downstream_h2 import Http2Downstream
    from pyproxy.http.router import Route, Router

_h2: Any = native_extension("_h2")
_DONE = struct.Struct("=iiIIqII")  # pp_glane_done


class GrpcLanes:
    """Per listener: the route every lane call takes, and what every lane shares."""

    __slots__ = ("ctx", "route", "slots", "limits", "block", "entries", "metrics")

    def __init__(self, ctx: HttpContext, route: Route) -> None:
        self.ctx = ctx
        self.route = route
        settings, limits = ctx.settings, ctx.listener.grpc
        ffi = _h2.ffi
        # In grpc_lane.h's slot order.
        self.slots = ffi.new(
            "int32_t[]", [REQUESTS, NATIVE_REQUESTS, EXPRESS_REQUESTS, FLAG_BASE + FLAG_INDEX["DR"]]
        )
        self.limits = ffi.new(
            "uint32_t[]",
            [
                settings.max_concurrent_streams,
                settings.max_headers,
                settings.max_header_bytes,
                limits.max_request_message_bytes,
                limits.max_response_message_bytes,
            ],
        )
        self.block = block_pointer(ctx.block, ffi)
        # grpc_lane.h's PP_GLANE_M_* order: where record_finished counts, for calls C accounts.
        self.metrics = ffi.new(
            "int64_t[]",
            [MSG_RECEIVED, MSG_SENT, HIST, HIST_SUM_NS, HIST_COUNT, E_STARTED, E_STATUS,
             len(STATUS_NAMES), CANCELLED, UNKNOWN],
        )  # fmt: skip
        self.entries: dict[bytes, int] = {}  # :path -> its method's entry in the table

    def attach(self, session: Http2Downstream) -> GrpcLane | None:
        lane = _h2.lib.pp_glane_attach(
            session.conn.session,
            self.block,
            self.slots,
            self.limits,
            int(self.route.grpc_timeout * 1e9),
        )
        return None if lane == _h2.ffi.NULL else GrpcLane(self, session, lane)

    def entry(self, path: bytes) -> int:
        entry = self.entries.get(path)
        if entry is None:
            entry = method_table(self.ctx).entry(method_of(path))
            if entry != OTHER_ENTRY:  # the table's methods only: the dict stays bounded
                self.entries[path] = entry
        return entry


def grpc_lanes(ctx: HttpContext) -> GrpcLanes | None:
    """The listener's GrpcLanes, or None when its calls are never carried in C."""
    route = grpc_lane_route(ctx.listener, ctx.router)
    return None if route is None else GrpcLanes(ctx, route)


def grpc_lane_route(listener: ListenerConfig, router: Router) -> Route | None:
    """The route the gRPC lane carries a listener's calls on, or None when it carries none:
    a gRPC listener with ``grpc_lane`` on the native codec, every lane's rule (sole_route),
    an h2c endpoint, and no filter on the route (what ctx.chain_for finds: the route's own
    filters, else the listener's). /server_info asks this too."""
    settings = listener.http
    if (
        _h2 is None
        or listener.mode is not ListenerMode.GRPC
        or not settings.grpc_lane
        or effective_http2_codec(settings.http2_codec) != "native"
    ):
        return None
    found = sole_route(router, settings)
    if found is None or found[1] != "http2":
        return None
    route = found[0]
    return None if (listener.filters if route.filters is None else route.filters) else route


class GrpcLane(LaneState):
    """One downstream connection's lane (see the module doc); freed with its session. It
    presents what Http2Downstream reads of a lane (H2Lane's ``state``, ``in_flight``, the read
    hooks, ``release_all``)."""

    __slots__ = (
        "lanes", "session", "lane", "state", "upstream", "_watchdog", "_info", "_due", "_size",
        "_io",
    )  # fmt: skip

    def __init__(self, lanes: GrpcLanes, session: Http2Downstream, lane: Any) -> None:
        self.lanes = lanes
        self.session = session
        self.lane = lane  # valid while session.conn is: the session frees it
        self.state = _h2.lib.pp_glane_state_of(lane)
        self.upstream: GrpcLaneUpstream | None = None
        self._watchdog: Any = None
        ffi = _h2.ffi
        self._info = ffi.new("pp_glane_handover *")
        self._due = ffi.new("int64_t *")
        self._size = ffi.new("size_t *")
        self._io = ffi.new("pp_glane_io *")
        _h2.lib.pp_glane_set_metrics(lane, lanes.metrics)
        session.carrier = self

    # ---- around each read of the downstream ---------------------------------------------

    def before_read(self, others: int, draining: bool) -> None:
        state = self.state  # note_read's, one call less on every read
        state.others = others
        state.closed = draining
        upstream = self.upstream
        if upstream is not None:
            self.state.up_others = upstream.reserved

    def after_read(self) -> None:
        """Send what the read took; account what ended; connect when a call found no upstream."""
        state = self.state
        if state.up_dirty:
            state.up_dirty = 0
            upstream = self.upstream
            if upstream is not None:
                upstream.flush()
        if state.down_dirty:
            state.down_dirty = 0
            self.session.mark_dirty()
        if state.done_count:
            self._account()
        if state.starved:
            state.starved = 0
            if self.upstream is None:
                self._connect()
        if state.due_sooner:
            state.due_sooner = 0
            self._rewatch()

    def carry(self, session: Any, data: bytes, t0: int) -> int | None:
        """One read of either session, its frames walked (H2Session._received): into the codec
        and the lane in one crossing. When the lane took all of it, what both sessions have to
        send leaves now, the other side's first (the call upstream, or its answer downstream),
        without a flush each: None. Else pp_h2_recv's result, for the session to read the
        events of (as after receive_data)."""
        conn = session.conn
        io = self._io
        lib = _h2.lib
        if lib.pp_glane_recv(
            self.lane, conn.session, data, len(data), conn._out, conn._events, conn._pending, io
        ):
            return io.n
        conn.output_pending = False
        session.ctx.block[LANE_READS_WHOLE] += 1
        buffer = _h2.ffi.buffer
        other = buffer(io.other_out, io.other_len)[:] if io.other_len else None
        own = buffer(io.self_out, io.self_len)[:] if io.self_len else None
        if session.timed:
            session.ctx.account_parse(perf_counter_ns() - t0, None)
        # Written as flush() writes: not once the connection is closed.
        down = self.session
        if session is down:
            upstream = self.upstream
            if other is not None and upstream is not None and not upstream.closed:
                upstream.stream.write(other)
        else:
            if other is not None and not down.closed:
                down.stream.write(other)
            if down.draining:  # calls may have ended, with or without bytes to send: done?
                down.lane_answered()
        if own is not None and not session.closed:
            session.stream.write(own)
        flushes = session.flushes
        if flushes.dirty:
            flushes.run()
        return None

    def _connect(self) -> None:
        lanes = self.lanes
        ctx, route = lanes.ctx, lanes.route
        cluster = route.cluster if route.cluster is not None else ctx.router.default_cluster
        if route.cluster is not None:
            target, source = route.cluster.peek(), ""
        else:
            target, source = self.session.target, self.session.source
        timeout, idle_timeout = connection_timeouts(cluster, ctx.listener.connect_timeout)
        pool: Any = ctx.pool  # the listener's UpstreamPool: its HTTP/2 pool is the owner's
        upstream = GrpcLaneUpstream(ctx, pool.h2, target, idle_timeout, self)
        self.upstream = upstream
        upstream.start_connect(source, timeout)

    # ---- the upstream connection ----------------------------------------------------------

    def upstream_ready(self, upstream: GrpcLaneUpstream) -> None:
        if upstream is self.upstream:
            _h2.lib.pp_glane_set_upstream(self.lane, upstream.conn.session)
            upstream.carrier = self

    def upstream_lost(self, upstream: GrpcLaneUpstream) -> None:
        """The connection fails or goes away: its calls go on (or end) on the general path, and
        the next call that finds no upstream connects again."""
        if upstream is not self.upstream:
            return
        _h2.lib.pp_glane_hand_over_all(self.lane)
        self.adopt_handed()
        _h2.lib.pp_glane_set_upstream(self.lane, _h2.ffi.NULL)
        upstream.carrier = None
        self.upstream = None

    def after_upstream_read(self) -> None:
        state = self.state
        if state.done_count:
            self._account()
        if state.down_dirty:
            state.down_dirty = 0
            self.session.lane_answered()
        if state.due_sooner:
            state.due_sooner = 0
            self._rewatch()

    # ---- accounts ---------------------------------------------------------------------

    def _account(self) -> None:
        """Per-method gRPC metrics of the calls C finished, as GrpcCall.finished records them;
        C counts the later calls of a method found here itself (pp_glane_learn: the same slots,
        the same status rule)."""
        ffi, lib = _h2.ffi, _h2.lib
        learn, lane = lib.pp_glane_learn, self.lane
        size = self._size
        records = lib.pp_glane_done_records(self.lane, size)
        data = ffi.buffer(records, size[0])[:]
        block = self.lanes.ctx.block
        entry_of = self.lanes.entry
        unpack = _DONE.unpack_from
        pos, end, step = 0, len(data), _DONE.size
        while pos < end:
            status, reset, requests, responses, elapsed, path_len, _ = unpack(data, pos)
            pos += step
            path = data[pos : pos + path_len]
            entry = entry_of(path)
            pos += path_len
            if entry != OTHER_ENTRY:
                learn(lane, path, path_len, entry)
            block[entry + E_STARTED] += 1
            if status < 0:
                status = CANCELLED if reset else UNKNOWN
            elif status >= len(STATUS_NAMES):
                status = UNKNOWN
            record_finished(block, entry, status, elapsed, requests, responses)

    # ---- handing over -------------------------------------------------------------------

    def adopt_handed(self) -> None:
        """An Exchange adopts each call waiting to be handed over (see the module doc)."""
        next_handover = _h2.lib.pp_glane_next_handover
        while (idx := next_handover(self.lane)) >= 0:
            self._adopt(idx)

    def _adopt(self, idx: int) -> None:
        lib, ffi = _h2.lib, _h2.ffi
        info = self._info
        lib.pp_glane_handover_of(self.lane, idx, info)
        block = ffi.buffer(info.block, info.block_len)[:]
        held = ffi.buffer(info.response, info.response_len)[:] if info.response_len else b""
        sid, upstream_id, started_ns, requests = (
            info.stream_id, info.upstream_id, info.started_ns, info.requests,
        )  # fmt: skip
        lib.pp_glane_release(self.lane, idx)
        upstream = self.upstream
        assert upstream is not None
        from pyproxy.codec.http2 import request_from_h2, response_from_h2  # lazy: hyper-h2
        from pyproxy.codec.http2_native import split_headers  # lazy: as above

        head: Any = request_from_h2(split_headers(block, 0, len(block)), False, True)
        stream = Http2UpstreamStream(upstream)
        upstream.reserved += 1
        stream.reused = False  # it was sent: never retried
        stream.stream_id = upstream_id
        stream.ended_out = True
        upstream.streams[upstream_id] = stream
        exchange = self.session.adopt_request(sid, head)
        exchange.adopt_call(self.lanes.route, stream, started_ns, requests)
        if held:  # the response's head C held (plain, :status 200): read first, as it came
            response: Any = response_from_h2(split_headers(held, 0, len(held)), True)
            exchange.response_head(response)
        # OVERDUE: the deadline adopt_call armed is past; it fires on the next tick.
        self.session.mark_dirty()

    def release_all(self) -> None:
        """The downstream connection ends: its calls in flight end as reset by the client, and
        the lane's upstream connection closes."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        lib = _h2.lib
        lib.pp_glane_abandon_all(self.lane)
        if self.state.done_count:
            self._account()
        upstream, self.upstream = self.upstream, None
        lib.pp_glane_set_upstream(self.lane, _h2.ffi.NULL)
        self.session.carrier = None
        if upstream is not None:
            upstream.carrier = None
            upstream.lane = None
            upstream.close_lane()

    # ---- deadlines -----------------------------------------------------------------------

    def _check_due(self) -> float:
        """Hand over the overdue (their deadline then fires on the general path); seconds
        until the next look (0: nothing due)."""
        lib = _h2.lib
        due = self._due
        while lib.pp_glane_expired(self.lane, perf_counter_ns(), due) >= 0:
            self.adopt_handed()
        if not due[0]:
            return 0.0
        return max((due[0] - perf_counter_ns()) / 1e9, 0.001)

    def _rewatch(self) -> None:
        """A read gave a call a deadline (a grpc-timeout, the route timeout, a held head's
        PP_GLANE_HOLD_NS) before the one the watchdog waits for (C says so: due_sooner)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watch()

    def _arm(self, delay: float) -> None:
        self._watchdog = self.lanes.ctx.loop.call_later(delay, self._watch) if delay else None

    def _watch(self) -> None:
        self._watchdog = None
        self._arm(self._check_due())


class GrpcLaneUpstream(Http2Upstream):
    """The lane's own upstream connection: its calls' streams, and those of the calls handed
    over from it; never in the pool (the general path does not share it), closed with its
    downstream connection."""

    __slots__ = ("lane",)

    def __init__(self, ctx, pool, key, idle_timeout: float, lane: GrpcLane) -> None:
        super().__init__(ctx, pool, key, idle_timeout)
        self.lane: GrpcLane | None = lane

    def _settings_arrived(self) -> None:
        super()._settings_arrived()
        if self.lane is not None and self.accepting and not self.closed:
            self.lane.upstream_ready(self)

    def _received(self, data: bytes) -> None:
        super()._received(data)
        lane = self.lane
        if lane is not None:
            lane.after_upstream_read()
            if lane.state.up_dirty:
                lane.state.up_dirty = 0
                self.flush()
            flushes = self.flushes
            if flushes.dirty:  # the answers C submitted leave in this read, not a callback later
                flushes.run()

    def handle(self, events: list) -> None:
        lane = self.lane
        if lane is not None:
            lane.adopt_handed()  # before their records are read
        super().handle(events)

    def _lost(self) -> None:
        if self.lane is not None:
            self.lane.upstream_lost(self)

    def goaway_received(self, last_stream_id: int, error_code: int) -> None:
        self._lost()
        super().goaway_received(last_stream_id, error_code)

    def protocol_failed(self, exc: Exception | None) -> None:
        self._lost()
        super().protocol_failed(exc)

    def eof_received(self) -> None:
        self._lost()
        super().eof_received()

    def stream_failed(self, error: OSError) -> None:
        self._lost()
        super().stream_failed(error)

    def _connect_failed(self, flag: str) -> None:
        lane, self.lane = self.lane, None
        if lane is not None and lane.upstream is self:
            lane.upstream = None  # the next call that finds none connects again
        super()._connect_failed(flag)

    def _maybe_idle(self) -> None:
        pass  # it lives as long as its downstream connection

    def close_lane(self) -> None:
        self.accepting = False
        if self.stream is not None and not self.closed:
            self.send_goaway(0, NO_ERROR)
        self._close(False)
