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

from pyproxy.counters import EXPRESS_REQUESTS, REQUESTS, STATUS_BASE, observe_duration
from pyproxy.http.exchange import Exchange
from pyproxy.native import http1_head_scanner

if TYPE_CHECKING:
    from pyproxy.http.context import HttpContext
    from pyproxy.http.downstream_h1 import Http1Downstream
    from pyproxy.http.router import Route
    from pyproxy.http.upstream_h1 import Http1Upstream

_scan = http1_head_scanner()


def express_routes(ctx: HttpContext) -> frozenset[int] | None:
    """The ids of the routes whose requests the express lane may carry; None: none may."""
    if (
        _scan is None
        or ctx.listener.mode != "http"
        or ctx.settings.codec != "fast"
        or ctx.access_log is not None
        or ctx.settings.server_timing
    ):
        return None
    routes = [ctx.router.default_route] if ctx.router.default_route else ctx.router.routes
    eligible = frozenset(id(route) for route in routes if _plain(ctx, route))  # type: ignore[arg-type]
    return eligible or None


def _plain(ctx: HttpContext, route: Route) -> bool:
    """No filter, and an HTTP/1 upstream."""
    if ctx.chain_for(route) is not None:
        return False
    cluster = route.cluster if route.cluster is not None else ctx.router.default_cluster
    protocol = cluster.protocol if cluster is not None else ctx.settings.upstream_protocol
    return protocol == "http1"


class Express:
    """One request on the express lane, between its head going up and its response coming back."""

    __slots__ = (
        "ctx",
        "session",
        "route",
        "upstream",
        "data",
        "target",
        "source",
        "started_ns",
        "timeout",
        "exchange",
    )

    def __init__(self, ctx: HttpContext, session: Http1Downstream, data: bytes) -> None:
        self.ctx = ctx
        self.session = session
        self.route: Any = None
        self.upstream: Any = None
        self.data = data  # the request as read: replayed into the codec if this materializes
        self.target: Any = None
        self.source = ""
        self.started_ns = perf_counter_ns()
        self.timeout = 0.0
        self.exchange: Exchange | None = None

    def response(self, data: bytes) -> bool:
        """The upstream's read: forwarded if it is one whole plain response, else False."""
        ctx = self.ctx
        found = _timed_scan(ctx, data, False)
        if found is None:
            return False
        size, status, _, _, _, length, close, _, _, wire = found
        if wire is None or close:
            return False  # HTTP/1.0, or the upstream wants to close: the general path's care
        if status == 204 or status == 304:
            length = 0
        elif length is None:
            return False
        if size + length != len(data):
            return False  # more to come, or more than one response
        session, upstream = self.session, self.upstream
        session.express = upstream.express = None
        session.stream.write(data if len(wire) == size else wire + data[size:])
        block = ctx.block
        if self.timeout:
            ctx.deadlines.disarm(self.timeout, self)
        block[STATUS_BASE + min(status // 100, 5) - 1] += 1
        block[EXPRESS_REQUESTS] += 1
        observe_duration(block, perf_counter_ns() - self.started_ns)
        ctx.pool.keep(upstream)
        return True

    def deadline_expired(self) -> None:
        if self.exchange is None:
            self.materialize()
        assert self.exchange is not None
        self.exchange.deadline_expired()

    def materialize(self) -> Exchange:
        """Become the Exchange the general path would have built for this request."""
        session, upstream = self.session, self.upstream
        session.express = upstream.express = None
        events = session.decode(self.data)  # the downstream codec sees the request it carried
        exchange = Exchange(self.ctx, session, events[0], None)
        exchange.adopt_express(self, upstream)
        self.exchange = exchange
        session.exchange = exchange
        return exchange


def start(session: Http1Downstream, data: bytes, eligible: frozenset[int]) -> bool:
    """Take the downstream's read onto the express lane if it is one whole plain request."""
    ctx = session.ctx
    found = _timed_scan(ctx, data, True)
    if found is None:
        return False
    size, method, target, _, headers, length, close, _, expect, wire = found
    if wire is None or close or expect or method == b"HEAD":
        return False
    if size + (length or 0) != len(data):
        return False  # a body still to come, or pipelined requests
    route = ctx.router.default_route
    if route is None:
        authority = next(value for name, value in headers if name == b"host")  # one, scanned
        route = ctx.router.match(authority, target)
        if route is None:
            return False  # the general path answers 404
    if id(route) not in eligible:
        return False
    cluster = route.cluster
    if cluster is not None:
        upstream_target, source = cluster.peek(), ""
    else:
        upstream_target, source = session.target, session.source
    upstream: Http1Upstream | None = ctx.pool.take_idle(upstream_target)
    if upstream is None:
        return False  # a connect: the general path takes this endpoint's turn and waits for it
    if cluster is not None:
        cluster.pick()  # round robin: the turn is taken
    express = Express(ctx, session, data)
    express.route, express.upstream = route, upstream
    express.target, express.source = upstream_target, source
    session.express = upstream.express = express
    ctx.block[REQUESTS] += 1
    if route.timeout > 0:
        ctx.deadlines.arm(route.timeout, express)
        express.timeout = route.timeout
    upstream.stream.write(data if len(wire) == size else wire + data[size:])
    return True


def _timed_scan(ctx: HttpContext, data: bytes, request: bool):
    limits = ctx.limits
    if not ctx.timed:
        return _scan(data, request, limits.max_header_bytes, limits.max_header_count)  # type: ignore[misc]
    t0 = perf_counter_ns()
    found = _scan(data, request, limits.max_header_bytes, limits.max_header_count)  # type: ignore[misc]
    block = ctx.block
    block[ctx.parse_ns] += perf_counter_ns() - t0
    block[ctx.parse_events] += 1
    return found
