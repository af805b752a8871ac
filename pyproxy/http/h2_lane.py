"""The native HTTP/2 lane: an h2c downstream's plain GETs carried to HTTP/1.1 upstreams in C.

On a listener whose requests all take one route to one HTTP/1 endpoint with no filter (the
native HTTP/1 lane's rule, native_lane.lane_route) and ``http2_lane: true``, each HTTP/2
downstream connection on the native codec gets an ``H2Lane``: C (native/h2_lane.c) takes, while
the session reads, every stream that is a plain GET the general path would send on as it is,
writes it as HTTP/1.1 on an idle upstream connection the lane holds, and answers the stream
itself when the response comes back whole and plain, with the accounts the general path keeps
(requests, status class, duration, bytes, the stage clock). No Exchange, event or header list
is made in Python for such a request; Python runs once per read and per upstream readiness.

Every other stream is the general path's, from the same session: C declines it and it reaches
Python as a record like any other. A stream the lane took whose answer is not plain (in pieces,
chunked, an error, EOF, a failed send, the route timeout) is handed over: an Exchange adopts it
with its request already sent (Exchange.adopt_sent, as for the HTTP/1 lane) and the upstream's
bytes go on through its codec, so what follows is the general path's, by construction, and no
request is sent twice by the lane.

The lane holds upstream connections instead of the pool: when a read passed requests to Python
for want of an idle one, it borrows that many from the pool after the read. They go back to
the pool as the connection ends (or are closed once idle past their timeout).
"""

from __future__ import annotations

import os
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from pyproxy.counters import (
    EXPRESS_REQUESTS,
    FLAG_BASE,
    FLAG_INDEX,
    NATIVE_REQUESTS,
    NOTIFY,
    OTHER,
    REQUESTS,
    STAGE_EVENTS,
    STAGE_NS,
    UPSTREAM_RX,
    UPSTREAM_TX,
)
from pyproxy.http.native_lane import lane_route
from pyproxy.native import block_pointer, effective_http2_codec, native_extension

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.downstream_h2 import Http2Downstream
    from pyproxy.http.router import Route
    from pyproxy.http.upstream_h1 import Http1Upstream

_h2: Any = native_extension("_h2")


class H2Lanes:
    """Per listener: the route every lane request takes, and what every lane shares."""

    __slots__ = ("ctx", "route", "slots", "limits", "timeout_ns", "block")

    def __init__(self, ctx: HttpContext, route: Route) -> None:
        self.ctx = ctx
        self.route = route
        settings = ctx.settings
        self.timeout_ns = int(route.timeout * 1e9)
        up_read, up_write = ctx.upstream_stages
        ffi = _h2.ffi
        # In h2_lane.h's slot order.
        self.slots = ffi.new("int32_t[]", [
            STAGE_NS + up_read, STAGE_EVENTS + up_read, STAGE_NS + up_write, STAGE_EVENTS + up_write,
            ctx.parse_ns, ctx.parse_events, STAGE_EVENTS + NOTIFY, STAGE_NS + OTHER,
            UPSTREAM_RX, UPSTREAM_TX, REQUESTS, EXPRESS_REQUESTS, NATIVE_REQUESTS,
            STAGE_NS, ctx.claim_end,
            FLAG_BASE + FLAG_INDEX["DR"], FLAG_BASE + FLAG_INDEX["UR"], FLAG_BASE + FLAG_INDEX["UT"],
        ])  # fmt: skip
        self.limits = ffi.new(
            "uint32_t[]",
            [settings.max_concurrent_streams, settings.max_headers, settings.max_header_bytes],
        )
        self.block = block_pointer(ctx.block, ffi)

    def attach(self, session: Http2Downstream) -> H2Lane | None:
        lane = _h2.lib.pp_lane_attach(
            session.conn.session, self.block, self.slots, self.ctx.timed, self.limits
        )
        return None if lane == _h2.ffi.NULL else H2Lane(self, session, lane)


def h2_lanes(ctx: HttpContext) -> H2Lanes | None:
    """The listener's H2Lanes, or None when its HTTP/2 connections carry no request in C."""
    settings = ctx.settings
    if (
        _h2 is None
        or not settings.http2_lane
        or effective_http2_codec(settings.http2_codec) != "native"
    ):
        return None
    found = lane_route(ctx)
    if found is None or found[1] is not None:  # a route with filters keeps the general path
        return None
    return H2Lanes(ctx, found[0])


class LaneState:
    """What Http2Downstream reads and sets of a lane's C state (the HTTP/2 lane's and the gRPC
    lane's start alike: in_flight, starved, last_sid, others, closed, served)."""

    __slots__ = ()
    state: Any

    @property
    def in_flight(self) -> int:
        return self.state.in_flight

    def note_read(self, others: int, draining: bool) -> None:
        """Before a read: the general path's streams count against the stream limit, and a
        draining connection takes no new stream."""
        state = self.state
        state.others = others
        state.closed = draining


class H2Lane(LaneState):
    """One HTTP/2 downstream connection's lane (see the module doc); freed with its session."""

    __slots__ = (
        "lanes",
        "session",
        "lane",
        "state",
        "upstreams",
        "wanted",
        "_watchdog",
        "_info",
        "_due",
        "_handed",
    )

    def __init__(self, lanes: H2Lanes, session: Http2Downstream, lane: Any) -> None:
        self.lanes = lanes
        self.session = session
        self.lane = lane  # valid while session.conn is: the session frees it
        self.state = _h2.lib.pp_lane_state_of(lane)
        self.upstreams: list[Http1Upstream | None] = []  # by slot index
        self.wanted = 0  # upstream connections to borrow from the pool when it has them
        self._watchdog: Any = None
        ffi = _h2.ffi
        self._info = ffi.new("pp_lane_handover *")
        self._due = ffi.new("int64_t *")
        self._handed = ffi.new("int *")

    # ---- around each read of the downstream ---------------------------------------------

    def before_read(self, others: int, draining: bool) -> None:
        self.note_read(others, draining)
        if self.wanted:
            self._borrow()

    def after_read(self) -> None:
        """Send what the read took; hand over what could not go; borrow for what starved."""
        lib = _h2.lib
        if lib.pp_lane_send(self.lane):
            self._hand_over_all()
        state = self.state
        if state.starved:
            # The general path took those requests, and the pool's idle connections with them:
            # the lane borrows as many as soon as the pool has them (before the next read).
            self.wanted = min(
                self.wanted + state.starved, self.lanes.ctx.settings.max_concurrent_streams
            )
            state.starved = 0
            self._borrow()

    def _borrow(self) -> None:
        ctx = self.lanes.ctx
        route = self.lanes.route
        target = route.cluster.peek() if route.cluster is not None else self.session.target
        pool = ctx.pool
        while self.wanted:
            upstream = pool.take_idle(target)
            if upstream is None:
                return
            if upstream.stream.buffered:
                pool.keep(upstream)
                return
            self.wanted -= 1
            self._lend(upstream)

    def _lend(self, upstream: Http1Upstream) -> None:
        lib = _h2.lib
        idx = lib.pp_lane_add_upstream(self.lane, upstream.stream.fd)
        if idx < 0:
            self.lanes.ctx.pool.keep(upstream)
            return
        upstreams = self.upstreams
        while len(upstreams) <= idx:
            upstreams.append(None)
        upstreams[idx] = upstream
        # The C read may hand the request back: a byte of its answer then counts as answered.
        upstream.answered = False
        upstream.stream.lend(self._readable(idx))
        if self._watchdog is None:
            self._arm(self._check_due())

    def _readable(self, idx: int):
        lane, readable, session = self.lane, _h2.lib.pp_lane_upstream_readable, self.session

        def on_readable() -> None:
            answer = readable(lane, idx)
            if answer == 1:  # PP_LANE_FLUSH
                session.lane_answered()
            elif answer:
                self._after_readable(idx, answer)

        return on_readable

    def _after_readable(self, idx: int, answer: int) -> None:
        lib = _h2.lib
        if answer == lib.PP_LANE_HANDOVER:
            self._hand_over(idx)
        elif answer == lib.PP_LANE_IDLE_READABLE:
            self._give_back(idx, keep=True)  # its own reader sees what stirred (EOF, mostly)
        else:  # PP_LANE_DROP: an answer sent (or its stream reset), the connection not reusable
            self._give_back(idx, keep=False)
            self.session.lane_answered()

    # ---- handing over -------------------------------------------------------------------

    def _hand_over_all(self) -> None:
        next_handover = _h2.lib.pp_lane_next_handover
        while (idx := next_handover(self.lane)) >= 0:
            self._hand_over(idx)

    def _hand_over(self, idx: int) -> None:
        """An Exchange adopts the slot's request, already sent, and carries it on (or, its
        stream reset, the connection is closed: the general path aborts its upstream too)."""
        lib, ffi = _h2.lib, _h2.ffi
        info = self._info
        lib.pp_lane_handover_of(self.lane, idx, info)
        sid, kind, err, started_ns = info.stream_id, info.kind, info.err, info.started_ns
        if kind == lib.PP_LANE_ABANDONED:
            self._give_back(idx, keep=False)
            return
        block = ffi.buffer(info.block, info.block_len)[:]
        data = ffi.buffer(info.data, info.data_len)[:] if info.data_len else b""
        upstream = self._take(idx)
        session = self.session
        from pyproxy.codec.http2 import request_from_h2  # lazy: hyper-h2, HTTP/2 workers only
        from pyproxy.codec.http2_native import split_headers  # lazy: as above

        head: Any = request_from_h2(split_headers(block, 0, len(block)), True, True)
        session.adopt_request(sid, head).adopt_sent(
            self.lanes.route, upstream, b"", started_ns, None
        )
        if kind == lib.PP_LANE_UP_DATA:
            if data:
                upstream.data_received(data)
            else:
                upstream.eof_received()
        elif kind == lib.PP_LANE_UP_FAILED:
            upstream.stream_failed(OSError(err, os.strerror(err)))
        elif kind == lib.PP_LANE_REQUEST_UNSENT:
            upstream.stream.write(data)
        # PP_LANE_OVERDUE: the deadline adopt_sent armed is past; it fires on the next tick (504).
        session.mark_dirty()

    def _take(self, idx: int) -> Http1Upstream:
        """The slot's connection, back in Python's hands (its bytes meanwhile counted)."""
        _h2.lib.pp_lane_release(self.lane, idx)
        upstream = self.upstreams[idx]
        assert upstream is not None
        self.upstreams[idx] = None
        upstream.stream.take_back(0, 0)
        return upstream

    def _give_back(self, idx: int, keep: bool) -> None:
        upstream = self._take(idx)
        if keep:
            self.lanes.ctx.pool.keep(upstream)
        else:
            upstream.abort()

    def release_all(self) -> None:
        """The downstream connection ends: idle upstreams back to the pool, busy ones closed
        (their streams are gone with it), handed-over ones to their Exchanges first."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        lib = _h2.lib
        for idx, upstream in enumerate(self.upstreams):
            if upstream is None:
                continue
            idle = lib.pp_lane_release(self.lane, idx)
            self.upstreams[idx] = None
            upstream.stream.take_back(0, 0)
            if idle:
                self.lanes.ctx.pool.keep(upstream)
            else:
                upstream.abort()

    # ---- timeouts ---------------------------------------------------------------------

    def _check_due(self) -> float:
        """Hand over the overdue, close the idle too long; seconds until the next look (0:
        no slot to watch). While a route timeout applies, the next look comes no later than
        one timeout from now: a request that starts meanwhile is not due before then."""
        lib = _h2.lib
        lanes = self.lanes
        due, handed = self._due, self._handed
        idle_ns = self._idle_ns()
        while True:
            now = perf_counter_ns()
            idx = lib.pp_lane_expired(self.lane, now, lanes.timeout_ns, idle_ns, due, handed)
            if idx < 0:
                break
            if handed[0]:
                self._hand_over(idx)
            else:
                self._give_back(idx, keep=False)
        if not due[0]:
            return 0.0
        wait = due[0] - perf_counter_ns()
        if lanes.timeout_ns:
            wait = min(wait, lanes.timeout_ns)
        return max(wait / 1e9, 0.001)

    def _idle_ns(self) -> int:
        for upstream in self.upstreams:
            if upstream is not None:
                return int(upstream.idle_timeout * 1e9)
        return 0

    def _arm(self, delay: float) -> None:
        self._watchdog = self.lanes.ctx.loop.call_later(delay, self._watch) if delay else None

    def _watch(self) -> None:
        self._watchdog = None
        self._arm(self._check_due())
        self.session.lane_answered()
