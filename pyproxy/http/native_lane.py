"""The native lane: a downstream connection and its upstream, relaying in C.

A request is either on the general path (exchange.py) or paired in C. When
every origin-form request on a listener takes one filterless route to one
endpoint (no route table, or a first route matching any host and path: each
request on a connection goes where the last one went), a connection whose
exchange just ended cleanly, with nothing buffered either way, is paired with
an idle upstream connection to that endpoint from the pool (the one just
released, the warmest): the event loop's reader callbacks for both sockets
become the C methods of an ``_express.Pair`` (native/express_lane.c), which
forwards each whole plain request and response as bytes and keeps every
account the general path keeps, in the same block slots.

The pair holds the upstream connection instead of the pool: with one endpoint
and no routing that is the connection the pool would have handed out next.
The pool's idle timeout still applies (a watchdog closes the upstream once it
has idled that long), and so does the route timeout (the watchdog hands an
overdue request back, and the general path answers 504).

The pair hands over at the first thing that is not plain — a request or
response in pieces, chunked, asking to close, pipelined, an error, EOF, a
short send — and goes inert. ``release`` takes both sockets back, turns a
request in flight into an Exchange with the time it has already spent, and
the handed-over event then runs through the Python objects exactly as it
would have without the pair. Behaviour outside the plain case is therefore
the general path's, by construction.
"""

from __future__ import annotations

import os
from time import perf_counter_ns
from typing import Any

from pyproxy.config import ListenerConfig, ListenerMode
from pyproxy.counters import (
    DOWNSTREAM_RX,
    DOWNSTREAM_TX,
    EXPRESS_REQUESTS,
    NATIVE_REQUESTS,
    NOTIFY,
    OTHER,
    REQUESTS,
    STAGE_EVENTS,
    STAGE_NS,
    UPSTREAM_RX,
    UPSTREAM_TX,
)
from pyproxy.http.context import HttpContext
from pyproxy.http.downstream_h1 import Http1Downstream
from pyproxy.http.router import Route
from pyproxy.http.upstream_h1 import Http1Upstream
from pyproxy.native import express_pair, http1_head_scanner

_express = express_pair()


class NativeLanes:
    """Per listener context: whether connections may pair, and what every pair shares."""

    __slots__ = ("ctx", "route", "slots", "timeout_ns")

    def __init__(self, ctx: HttpContext, route: Route) -> None:
        self.ctx = ctx
        self.route = route
        self.timeout_ns = int(route.timeout * 1e9)
        (down_read, down_write), (up_read, up_write) = ctx.downstream_stages, ctx.upstream_stages
        # In express_lane.c's `enum slot` order.
        self.slots = (
            STAGE_NS + down_read, STAGE_EVENTS + down_read, STAGE_NS + down_write, STAGE_EVENTS + down_write,
            STAGE_NS + up_read, STAGE_EVENTS + up_read, STAGE_NS + up_write, STAGE_EVENTS + up_write,
            ctx.parse_ns, ctx.parse_events, STAGE_EVENTS + NOTIFY, STAGE_NS + OTHER,
            DOWNSTREAM_RX, DOWNSTREAM_TX, UPSTREAM_RX, UPSTREAM_TX,
            REQUESTS, EXPRESS_REQUESTS, NATIVE_REQUESTS,
            STAGE_NS, ctx.claim_end,
        )  # fmt: skip

    def pair(self, downstream: Http1Downstream) -> bool:
        """Between requests: pair the connection with an idle upstream if both are at rest."""
        if downstream.stream.buffered or not downstream.stream.reading:
            return False
        route = self.route
        target = route.cluster.peek() if route.cluster is not None else downstream.target
        pool = self.ctx.pool
        upstream = pool.take_idle(target)
        if upstream is None:
            return False
        if upstream.stream.buffered:
            pool.keep(upstream)
            return False
        NativeLane(self, downstream, upstream)
        return True


def native_lanes(ctx: HttpContext) -> NativeLanes | None:
    """The listener's NativeLanes, or None when its connections cannot pair."""
    route = ctx.router.sole_route
    if (
        _express is None
        or http1_head_scanner() is None
        or not _pairable(ctx.listener)
        or ctx.access_log is not None
        or route is None
        or ctx.chain_for(route) is not None
        or (route.cluster is not None and len(route.cluster.endpoints) != 1)
    ):
        return None
    cluster = route.cluster if route.cluster is not None else ctx.router.default_cluster
    protocol = cluster.protocol if cluster is not None else ctx.settings.upstream_protocol
    return NativeLanes(ctx, route) if protocol == "http1" else None


def _pairable(listener: ListenerConfig) -> bool:
    """A listener whose HTTP/1.1 exchanges C may carry: HTTP mode, the fast codec (C checks
    heads with the same scan), no per-request stage trace (Server-Timing) to keep."""
    http = listener.http
    return (
        listener.mode is ListenerMode.HTTP
        and http.express_lane == "native"
        and http.codec == "fast"
        and not http.server_timing
    )


class NativeLane:
    """One downstream connection paired with its upstream connection (see the module doc)."""

    __slots__ = ("lanes", "downstream", "upstream", "pair", "_watchdog")

    def __init__(
        self, lanes: NativeLanes, downstream: Http1Downstream, upstream: Http1Upstream
    ) -> None:
        ctx = lanes.ctx
        self.lanes = lanes
        self.downstream, self.upstream = downstream, upstream
        # Responses the pair carries whole are not the business of a later retry decision: a
        # request in flight at the handover counts as answered once Python reads a byte of it.
        upstream.answered = False
        down, up = downstream.stream, upstream.stream
        limits = ctx.limits
        self.pair: Any = _express.Pair(
            down.fd, up.fd, ctx.block, lanes.slots, ctx.timed,
            limits.max_header_bytes, limits.max_header_count, self._handover,
        )  # fmt: skip
        down.lend(self.pair.downstream_readable)
        up.lend(self.pair.upstream_readable)
        downstream.lane = self
        self._watchdog = ctx.loop.call_later(self._next_check(perf_counter_ns()) / 1e9, self._watch)

    def release(self, keep_upstream: bool = True) -> None:
        """Take both sockets back; a request in flight goes on as an Exchange."""
        pair = self.pair
        pair.detach()
        self._watchdog.cancel()
        ctx, downstream, upstream = self.lanes.ctx, self.downstream, self.upstream
        downstream.lane = None
        downstream.stream.take_back(pair.down_in, pair.down_out)
        upstream.stream.take_back(pair.up_in, pair.up_out)
        if pair.in_flight:
            downstream.resume_sent(self.lanes.route, upstream, pair.request, pair.started_ns)
        elif keep_upstream:
            ctx.pool.keep(upstream)
        else:
            upstream.stream.close()

    # ---- timeouts ---------------------------------------------------------------------

    def _next_check(self, now: int) -> int:
        """Nanoseconds until the request in flight is overdue or the upstream has idled too long.

        While idle, the check comes no later than one route timeout from now: a request that
        starts meanwhile is not due before then.
        """
        pair = self.pair
        timeout_ns = self.lanes.timeout_ns
        idle_ns = int(self.upstream.idle_timeout * 1e9)
        if pair.in_flight:
            due = pair.started_ns + timeout_ns if timeout_ns else now + idle_ns
        else:
            due = pair.last_active_ns + idle_ns
            if timeout_ns:
                due = min(due, now + timeout_ns)
        return max(due - now, 0)

    def _watch(self) -> None:
        if self._next_check(perf_counter_ns()) > 0:  # not yet: timers may fire early
            self._watchdog = self.lanes.ctx.loop.call_later(
                self._next_check(perf_counter_ns()) / 1e9, self._watch
            )
        elif self.pair.in_flight:
            self.release()  # its deadline, armed already past due, fires on the next tick: 504
        else:
            self.release(keep_upstream=False)  # idle past the pool's timeout: close it

    # ---- what the pair hands over -------------------------------------------------------

    def _handover(self, kind: int, payload: Any) -> None:
        self.release()
        downstream, upstream = self.downstream, self.upstream
        if kind == _express.DOWN_DATA:
            if payload:
                downstream.data_received(payload)
            else:
                downstream.eof_received()
        elif kind == _express.UP_DATA:
            if payload:
                upstream.data_received(payload)
            else:
                upstream.eof_received()
        elif kind == _express.DOWN_FAILED:
            downstream.stream_failed(OSError(payload, os.strerror(payload)))
        elif kind == _express.UP_FAILED:
            upstream.stream_failed(OSError(payload, os.strerror(payload)))
        elif kind == _express.REQUEST_UNSENT:
            upstream.stream.write(payload)
        elif kind == _express.RESPONSE_UNSENT:
            downstream.stream.write(payload)
        # DOWN_READABLE, UP_IDLE_READABLE: nothing was read; the streams' own readers fire next.
