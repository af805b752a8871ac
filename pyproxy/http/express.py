"""The express lane: a plain HTTP/1.1 request and response with nothing to change, moved as bytes.

DESIGN.md asks that HTTP mode cost as little as the protocol allows when no
filter is configured. The common sidecar exchange is exactly that: one whole
bodyless (or small-bodied) request in one read, a pooled keep-alive upstream,
one whole Content-Length response in one read. For it, the general path
builds an Exchange, runs two codecs' state machines and passes six events
through four objects; the express lane validates each head with the native
scanner, forwards the bytes it read (less hop-by-hop lines), and keeps the
accounts (requests, status class, duration histogram, stage clock).

An express request is a lazy Exchange. The moment anything else happens —
the response comes in pieces, is chunked, asks to close, the upstream fails,
the route timeout fires, the downstream sends more, closes or pushes back —
``materialize`` replays the request into the downstream codec, builds the
Exchange the general path would have built, tells the upstream codec what
was sent, and the event continues on the general path. So behaviour outside
the common case is the general path's, by construction.

Eligible requests: on an HTTP-mode listener with the fast codec (and the
native scanner built), no access log and no Server-Timing (they need the
per-request stage trace the general path keeps), routed to a route with no
filter and an HTTP/1 upstream (decided once per listener context, per route).
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from pyproxy.chain.api import HeaderMap
from pyproxy.codec.events import Body, Buffer, ResponseHead
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.codec.http1_fast import join_head, status_line
from pyproxy.counters import EXPRESS_REQUESTS, REQUESTS, STATUS_BASE, observe_duration
from pyproxy.http.exchange import Exchange, start_chain
from pyproxy.native import http1_head_scanner

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.downstream_h1 import Http1Downstream
    from pyproxy.http.router import Route
    from pyproxy.http.upstream_h1 import Http1Upstream

_scan = http1_head_scanner()


def express_routes(ctx: HttpContext) -> dict[int, Any] | None:
    """Route id → its chain factory (or None) for the routes the express lane may carry; None: none."""
    if (
        _scan is None
        or ctx.settings.express_lane == "off"
        or ctx.listener.mode != "http"
        or ctx.settings.codec != "fast"
        or ctx.access_log is not None
        or ctx.settings.server_timing
    ):
        return None
    routes = [ctx.router.default_route] if ctx.router.default_route else ctx.router.routes
    eligible = {
        id(route): ctx.chain_for(route)  # type: ignore[arg-type]
        for route in routes
        if _eligible(ctx, route)  # type: ignore[arg-type]
    }
    return eligible or None


def _eligible(ctx: HttpContext, route: Route) -> bool:
    """An HTTP/1 upstream, and filters (if any) that look at headers only."""
    chain = ctx.chain_for(route)
    if chain is not None and (
        chain.decodes_body or chain.hooks["encode_data"] or chain.hooks["encode_trailers"]
    ):
        return False
    cluster = route.cluster if route.cluster is not None else ctx.router.default_cluster
    protocol = cluster.protocol if cluster is not None else ctx.settings.upstream_protocol
    return protocol == "http1"


class Express:
    """One request on the express lane; to its filters (if any) it is their exchange."""

    __slots__ = (
        "ctx",
        "downstream",
        "route",
        "upstream",
        "data",
        "target",
        "source",
        "started_ns",
        "timeout",
        "chain",
        "exchange",
    )

    def __init__(self, ctx: HttpContext, downstream: Http1Downstream, data: bytes) -> None:
        self.ctx = ctx
        self.downstream = downstream
        self.route: Any = None
        self.upstream: Any = None
        self.data = data  # the request as read: replayed into the codec if this materializes
        self.target: Any = None
        self.source = ""
        self.started_ns = perf_counter_ns()
        self.timeout = 0.0
        self.chain: Any = None  # the route's filters, when it has some
        self.exchange: Exchange | None = None  # once materialized

    @classmethod
    def in_flight(
        cls, ctx: HttpContext, downstream, upstream, route: Route, data: bytes, started_ns: int
    ) -> Express:
        """A request the native lane (native_lane.py) sent upstream and handed back before its
        response: carried on from here, its route timeout counting from when it was read."""
        express = cls(ctx, downstream, data)
        express.started_ns = started_ns
        express.route, express.upstream = route, upstream
        express.target, express.source = _destination(route, downstream)
        downstream.express = upstream.express = express
        if route.timeout > 0:
            left = route.timeout - (perf_counter_ns() - started_ns) / 1e9
            ctx.deadlines.arm(route.timeout, express, due=ctx.loop.time() + left)
            express.timeout = route.timeout
        return express

    # ---- the response --------------------------------------------------------------

    def response(self, data: bytes) -> bool:
        """The upstream's read: forwarded if it is one whole plain response, else False."""
        ctx = self.ctx
        found = _timed_scan(ctx, data, False)
        if found is None:
            return False
        size, status, reason, version, headers, length, close, _, _, wire = found
        if wire is None or close:
            return False  # HTTP/1.0, or the upstream wants to close: the general path's care
        if status == 204 or status == 304:
            length = 0
        elif length is None:
            return False
        if size + length != len(data):
            return False  # more to come, or more than one response
        out = data if len(wire) == size else wire + data[size:]
        chain = self.chain
        if chain is not None and chain.factory.encodes:
            header_map = HeaderMap(strip_hop_by_hop(headers), {b":status": b"%d" % status})
            passed = chain.encode_headers(header_map, length == 0)
            if self.exchange is not None:
                return True  # a filter answered instead (the Exchange did, and dropped this)
            if not passed:
                head = ResponseHead(status, reason, headers, version, True, length, False, wire)
                self._materialize_holding_response(data, head, data[size:])
                return True
            if header_map.changed:
                out = _response_bytes(header_map, status, reason, data[size:])
        downstream, upstream = self.downstream, self.upstream
        downstream.express = upstream.express = None
        downstream.stream.write(out)
        block = ctx.block
        if self.timeout:
            ctx.deadlines.disarm(self.timeout, self)
        block[STATUS_BASE + min(status // 100, 5) - 1] += 1
        block[EXPRESS_REQUESTS] += 1
        observe_duration(block, perf_counter_ns() - self.started_ns)
        lanes = ctx.native_lanes
        if lanes is None or not lanes.pair(downstream, upstream, self.route):
            ctx.pool.keep(upstream)
        if chain is not None:
            # The response is already on its way (nothing corked here): the filters'
            # end-of-request work can run now, without a loop turn of its own.
            self.chain = None
            chain.destroy()
        return True

    # ---- what filters (and timers) call on their exchange ----------------------------

    def deadline_expired(self) -> None:
        if self.exchange is None:
            self.materialize()
        assert self.exchange is not None
        self.exchange.deadline_expired()

    def headers_decoded(self) -> None:
        """A filter resumed the request head: the general path carries it on."""
        if self.exchange is None:
            self._materialize_unsent()
        assert self.exchange is not None
        self.exchange.headers_decoded()

    def forward_response_head(self, end_stream: bool) -> None:
        """The filters let the response head through (``response`` sends it on)."""

    def filter_local_reply(self, *args) -> None:
        if self.exchange is None:
            if self.upstream.express is self:
                self.materialize()  # the request is upstream: the Exchange abandons it
            else:
                self._materialize_unsent()
        assert self.exchange is not None
        self.exchange.filter_local_reply(*args)

    # ---- becoming an Exchange -------------------------------------------------------

    def materialize(self) -> Exchange:
        """Become the Exchange the general path would have built (the request is upstream)."""
        self.upstream.express = None
        exchange, _ = self._exchange()
        exchange.adopt_express(self, self.upstream)
        return exchange

    def _materialize_unsent(self) -> Exchange:
        """Become the Exchange for a request a filter holds or answers: nothing went upstream."""
        self.ctx.pool.keep(self.upstream)  # taken for this request, unused
        exchange, events = self._exchange()
        exchange.started_ns = self.started_ns
        exchange.route = self.route
        for event in events[1:]:  # the body (already whole) and the end wait for the upstream
            if type(event) is Body:
                exchange.request_body(event.data)
        exchange.request_end()
        return exchange

    def _exchange(self) -> tuple[Exchange, list]:
        """The Exchange for this request, its filters handed over; the request's events."""
        downstream = self.downstream
        downstream.express = None
        events = downstream.decode(self.data)  # the downstream codec sees the request it carried
        exchange = Exchange(self.ctx, downstream, events[0], None)
        self.exchange = downstream.exchange = exchange
        if self.chain is not None:
            exchange.chain, self.chain.exchange = self.chain, exchange
            self.chain = None
        return exchange, events

    def _materialize_holding_response(self, data: bytes, head: ResponseHead, body) -> None:
        """A filter holds the response head: the Exchange takes it, and the body, from here."""
        exchange = self.materialize()
        self.upstream.codec.receive_data(data)  # its state: this response was read
        exchange.status = head.status
        exchange.response_head_in = head
        if body:
            exchange.response_body(body)
        exchange.response_end()


_NOT_ELIGIBLE = object()


def start(downstream: Http1Downstream, data: bytes) -> bool:
    """Take the downstream's read onto the express lane if it is one whole plain request."""
    ctx = downstream.ctx
    eligible = ctx.express_routes
    assert eligible is not None  # the downstream checks before calling
    found = _timed_scan(ctx, data, True)
    if found is None:
        return False
    size, method, target, _, headers, length, close, _, expect, wire = found
    if wire is None or close or expect or method == b"HEAD":
        return False
    if size + (length or 0) != len(data):
        return False  # a body still to come, or pipelined requests
    route = ctx.router.default_route
    authority = b""
    if route is None:
        authority = _host(headers)
        route = ctx.router.match(authority, target)
        if route is None:
            return False  # the general path answers 404
    factory = eligible.get(id(route), _NOT_ELIGIBLE)
    if factory is _NOT_ELIGIBLE:
        return False
    upstream_target, source = _destination(route, downstream)
    upstream: Http1Upstream | None = ctx.pool.take_idle(upstream_target)
    if upstream is None:
        return False  # a connect: the general path takes this endpoint's turn and waits for it
    if route.cluster is not None:
        route.cluster.pick()  # round robin: the turn is taken
    express = Express(ctx, downstream, data)
    express.route, express.upstream = route, upstream
    express.target, express.source = upstream_target, source
    downstream.express = express
    ctx.block[REQUESTS] += 1
    out = data if len(wire) == size else wire + data[size:]
    if factory is not None:
        authority = authority or _host(headers)
        passed = start_chain(express, factory, method, target, headers, authority, not length)
        if express.exchange is not None:
            return True  # a filter answered, or resumed later: the Exchange carries on
        if not passed:
            express._materialize_unsent().hold_if_chain_holds()
            return True
        header_map = express.chain.maps["decode"]
        if header_map.changed:
            out = _request_bytes(header_map, data[size:])
    if route.timeout > 0:
        ctx.deadlines.arm(route.timeout, express)
        express.timeout = route.timeout
    upstream.express = express
    upstream.stream.write(out)
    return True


def _destination(route: Route, downstream: Http1Downstream) -> tuple[Any, str]:
    """Where the route sends a request, and the source address to bind: the cluster's next
    endpoint (its turn not yet taken), or the downstream's default target."""
    if route.cluster is not None:
        return route.cluster.peek(), ""
    return downstream.default_target()


def _host(headers) -> bytes:
    for name, value in headers:
        if name == b"host":
            return value
    return b""  # unreachable: the scanner takes HTTP/1.1 heads with exactly one Host


# ---- heads a filter changed, written anew (hop-by-hop fields never go on) --------------


def _request_bytes(header_map: HeaderMap, body: bytes) -> bytes:
    pseudo = header_map.pseudo
    fields = strip_hop_by_hop(header_map.headers)
    length = None
    if body and not any(name == b"content-length" for name, _ in fields):
        length = (b"content-length", b"%d" % len(body))
    start: list[Buffer] = [pseudo[b":method"], b" ", pseudo[b":path"], b" HTTP/1.1\r\n"]
    return join_head(start, fields, length, None) + body


def _response_bytes(header_map: HeaderMap, status: int, reason: bytes, body: bytes) -> bytes:
    status = int(header_map.pseudo.get(b":status", b"%d" % status))
    fields = [(n, v) for n, v in header_map.headers if n != b"content-length"]
    length = None if status == 204 or status == 304 else (b"content-length", b"%d" % len(body))
    return join_head([status_line(status, reason)], fields, length, None) + body


def _timed_scan(ctx: HttpContext, data: bytes, request: bool):
    limits = ctx.limits
    if not ctx.timed:
        return _scan(data, request, limits.max_header_bytes, limits.max_header_count)  # type: ignore[misc]
    t0 = perf_counter_ns()
    found = _scan(data, request, limits.max_header_bytes, limits.max_header_count)  # type: ignore[misc]
    ctx.account_parse(perf_counter_ns() - t0, None)
    return found
