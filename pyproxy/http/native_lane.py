"""The native lane: a downstream connection and its upstream, relaying in C.

A request is either on the general path (exchange.py) or paired in C. When
every origin-form request on a listener takes one route to one endpoint (no
route table, or a first route matching any host and path: each request on a
connection goes where the last one went), a connection whose
exchange just ended cleanly, with nothing buffered either way, is paired with
an idle upstream connection to that endpoint from the pool (the one just
released, the warmest): the event loop's reader callbacks for both sockets
become the C methods of an ``_express.Pair`` (native/express_lane.c), which
forwards each whole plain request and response as bytes and keeps every
account the general path keeps, in the same block slots.

A route with filters keeps them: the pair calls back once per head. The
request hook starts the request's HttpChain (the general path's own, with
this lane standing in for the Exchange) and runs the request-header filters;
the response hook runs the response-header ones; the done hook ends the chain
as the exchange ends. A chain with body or trailer filters gets each message's
body with its head (the pair carries only messages read whole, framed by
Content-Length, so no trailers): the hook runs the body filters over it once,
as the whole body with the end of the stream, right after the head's. A body
they let through as it came goes on as read; any other outcome (held, changed,
answered) is taken like a head, and the Exchange that adopts the chain is
handed what the filters let through, never the body again (one filter with both
response hooks runs a response's head and body in one step, HttpChain.encode_whole,
its head's edit checked after the body). A chain with no
request filter starts at the response hook instead (the pair calls no request hook; the request's header
map is built from its bytes only if something reads it), or where an Exchange
adopts the request in flight. A head the filters pass unchanged goes on as read, a
changed one as the bytes the general path would write (heads.paired_*_head);
a head a filter holds or answers, or whose new framing the pair cannot carry,
is taken: an Exchange adopts the chain where it stands and carries the
message on, so no filter runs twice and nothing is sent twice.

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

from pyproxy.chain.api import HeaderMap
from pyproxy.chain.http_chain import ChainFactory, HttpChain
from pyproxy.codec.http1_backend import make_http1_codec
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
from pyproxy.http.exchange import end_chain, start_chain
from pyproxy.http.heads import paired_request_edit, paired_response_edit
from pyproxy.http.request import authority_of
from pyproxy.http.router import Route, sole_route
from pyproxy.http.upstream_h1 import Http1Upstream
from pyproxy.native import express_pair, http1_head_scanner

_express = express_pair()
_STATUS = [b"%d" % code for code in range(600)]  # a response's :status, made once


class NativeLanes:
    """Per listener context: whether connections may pair, and what every pair shares."""

    __slots__ = (
        "ctx", "route", "chain", "ends_with_request", "ends_with_response", "starts_late", "slots",
        "timeout_ns", "bodies", "decodes_body", "encodes_body", "whole",
    )  # fmt: skip

    def __init__(self, ctx: HttpContext, route: Route, chain: ChainFactory | None) -> None:
        self.ctx = ctx
        self.route = route
        self.chain = chain  # the route's filters, or None
        # Some filter looks at bodies or trailers: the hooks get each message's body too.
        self.bodies = chain is not None and not chain.heads_only
        self.decodes_body = chain is not None and chain.decodes_body
        self.encodes_body = chain is not None and bool(
            chain.hooks["encode_data"] or chain.hooks["encode_trailers"]
        )
        # One filter with both response hooks: the response hook runs them in one step.
        self.whole = chain is not None and chain.whole is not None
        # No response filter and no end-of-request hook: a request head they pass unchanged
        # ends its chain at once, and the pair need not call back at the exchange's end.
        self.ends_with_request = chain is not None and not (chain.finishers or chain.encodes)
        # No end-of-request hook: the response filters' pass ends the chain.
        self.ends_with_response = chain is not None and not chain.finishers
        # Response filters only: nothing runs on the request, so its chain starts at the
        # response (the pair calls no request hook) or when an Exchange adopts it.
        self.starts_late = (
            chain is not None
            and not (chain.hooks["decode_headers"] or chain.decodes_body)
            and chain.encodes
        )
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
    http = ctx.settings
    found = lane_route(ctx)
    if (
        _express is None
        or http1_head_scanner() is None
        or http.express_lane != "native"
        or found is None
    ):
        return None
    return NativeLanes(ctx, *found)


def lane_route(ctx: HttpContext) -> tuple[Route, ChainFactory | None] | None:
    """The one route (and its filters) every request of the listener takes when a native lane
    may carry its requests in C, else None. The rule both HTTP lanes (this one and h2_lane.py)
    follow: HTTP mode, the fast codec (C checks HTTP/1 heads with the same scan), sole_route's
    rule, and an endpoint speaking HTTP/1.1."""
    found = sole_route(ctx.router, ctx.settings)
    if found is None or not _lane_listener(ctx.listener) or found[1] != "http1":
        return None
    return found[0], ctx.chain_for(found[0])


def _lane_listener(listener: ListenerConfig) -> bool:
    http = listener.http
    return listener.mode is ListenerMode.HTTP and http.codec == "fast" and not http.server_timing


class NativeLane:
    """One downstream connection paired with its upstream connection (see the module doc).

    With filters it is also, for the request in flight, what its chain calls the exchange:
    ``ctx``, ``route``, ``downstream``, ``target``, ``status`` and ``flag`` as filters read them, and the
    chain's two calls back (a local reply is noted for the Exchange that will send it).
    """

    __slots__ = (
        "lanes", "ctx", "route", "downstream", "upstream", "pair", "_watchdog",
        "chain", "status", "flag", "passed", "reply", "late_for", "through",
    )  # fmt: skip

    @property
    def target(self):
        """The upstream the request in flight went to, as an Exchange's `target` (filters read
        it as upstream.address)."""
        return self.upstream.key

    @property
    def started_ns(self) -> int:
        """When the request in flight was read, as an Exchange's `started_ns`."""
        return self.pair.started_ns

    def __init__(
        self, lanes: NativeLanes, downstream: Http1Downstream, upstream: Http1Upstream
    ) -> None:
        ctx = lanes.ctx
        self.lanes = lanes
        self.ctx, self.route = ctx, lanes.route
        self.downstream, self.upstream = downstream, upstream
        self.chain: HttpChain | None = None  # the filters' pass over the request in flight
        self.status = 0
        self.flag = ""  # the pair ends no request with a response flag
        # The filters' verdict on the head a hook handed over (None: the hook raised), and
        # their local reply (send_local_reply's arguments) if they answered.
        self.passed: bool | None = None
        self.reply: tuple | None = None
        # With a late-started chain: the exchange (pair.served at its response hook) whose
        # chain self.chain is; an earlier one's is not the request in flight's.
        self.late_for = -1
        # While the hook runs a body through the chain: what its filters let through, as
        # (data, end_stream) in order (None otherwise: the chain's Exchange takes it).
        self.through: list | None = None
        # Responses the pair carries whole are not the business of a later retry decision: a
        # request in flight at the handover counts as answered once Python reads a byte of it.
        upstream.answered = False
        down, up = downstream.stream, upstream.stream
        limits = ctx.limits
        self.pair: Any = _express.Pair(
            down.fd, up.fd, ctx.block, lanes.slots, ctx.timed,
            limits.max_header_bytes, limits.max_header_count, self._handover,
        )  # fmt: skip
        chain = lanes.chain
        if chain is None:
            pass
        elif lanes.starts_late:
            self.pair.set_hooks(None, self._late_response_hook, self._done_hook, lanes.bodies)
        else:
            response_hook = self._response_hook if chain.encodes else None
            self.pair.set_hooks(self._request_hook, response_hook, self._done_hook, lanes.bodies)
        down.lend(self.pair.downstream_readable)
        up.lend(self.pair.upstream_readable)
        downstream.lane = self
        self._watchdog = ctx.loop.call_later(self._next_check(perf_counter_ns()) / 1e9, self._watch)

    def release(self, keep_upstream: bool = True) -> None:
        """Take both sockets back; a request in flight goes on as an Exchange."""
        pair = self.pair
        pair.detach()
        pair.set_hooks(None, None, None)  # the hooks hold this lane: no cycle left behind
        self._watchdog.cancel()
        ctx, downstream, upstream = self.lanes.ctx, self.downstream, self.upstream
        downstream.lane = None
        downstream.stream.take_back(pair.down_in, pair.down_out)
        upstream.stream.take_back(pair.up_in, pair.up_out)
        chain, self.chain = self.chain, None  # no lane <-> chain cycle left behind
        if pair.in_flight:
            late = None
            if self.lanes.starts_late:
                if self.late_for != pair.served:
                    chain = None  # an earlier exchange's: this request's has not started
                if chain is None:
                    late = self.lanes.chain  # the Exchange starts it
            downstream.resume_sent(self.route, upstream, pair.request, pair.started_ns, chain, late)
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

    # ---- the route's filters, called by the pair ---------------------------------------

    def _request_hook(
        self, method: bytes, target: bytes, fields: list, authority: bytes, content_length: int,
        body: bytes = b"",
    ) -> bytes | list | bool | None:  # fmt: skip
        """Run the request-header filters, then the body ones over ``body`` (whole) if any:
        None or True (go on as read; True: the chain is over already), the new head (bytes,
        or the fields the pair writes it from; the body as read), or False (taken)."""
        self.passed = None
        self.reply = None
        self.through = None
        length = content_length if content_length >= 0 else None
        lanes = self.lanes
        factory: Any = lanes.chain  # set: the hooks are set only with a chain
        passed = start_chain(self, factory, method, target, fields, authority, not length)
        if not passed:
            self.passed = passed
            return False
        chain: Any = self.chain
        self.passed = True  # for the Exchange that adopts the chain if the pair takes it
        # No response filter, no end-of-request work, nothing held: the chain is over now.
        over = chain.state is None and lanes.ends_with_request
        headers = chain.maps["decode"]
        edited = None
        if headers.changed:
            edited = paired_request_edit(method, target, length, headers)
            if edited is None:
                return False
        if length and lanes.decodes_body:
            if not self._through_as_read(chain.decode_data, body):
                return False
            over = chain.state is None and lanes.ends_with_request
        if edited is None:
            if over:
                self.chain = None
                chain.destroy()
                return True  # forward as read, no done hook
            return None
        if over:
            self._let_go(chain)
        return edited

    def _response_hook(
        self, status: int, fields: list, content_length: int, body: bytes = b""
    ) -> bytes | list | bool | None:
        """Run the response-header filters, then the body ones over ``body`` (whole) if any:
        None (go on as read), the new head (bytes, or the fields the pair writes it from; the
        body as read), or False (taken)."""
        self.passed = None
        self.through = None
        self.status = status
        chain: Any = self.chain
        as_read = _STATUS[status]  # 200-599: the pair carries no other
        headers = HeaderMap(fields, {b":status": as_read})
        lanes = self.lanes
        if lanes.whole and chain.state is None:
            return self._whole_response(chain, as_read, headers, body)
        if not chain.encode_headers(headers, False):
            self.passed = False
            return False
        self.passed = True
        edited = None
        if headers.changed:
            edited = paired_response_edit(as_read, headers)
            if edited is None:
                return False
        # As the general path feeds a response of no body its end (a body hook sees it too).
        if lanes.encodes_body and not self._through_as_read(chain.encode_data, body):
            return False
        if chain.state is None and lanes.ends_with_response:
            self._let_go(chain)  # the filters' last word
        return edited

    def _whole_response(
        self, chain: HttpChain, as_read: bytes, headers: HeaderMap, body: bytes
    ) -> list | bool | None:
        """The response hook's work for a chain of one filter with both response hooks: head
        and body through them in one step (HttpChain.encode_whole). The head's edit is checked
        once the body went through: a head the pair cannot write is taken with what the body
        hook let through, which the Exchange sends after it (the filter sees its head and body
        once, in order, as when the head is taken before the body)."""
        self.through = through = []
        outcome = chain.encode_whole(headers, body)  # self.passed stays None if a hook raises
        if not outcome:
            self.passed = False
            return False
        self.passed = True
        if outcome == 2:
            through.append((body, True))
        elif not (
            len(through) == 1 and through[0][1] and (through[0][0] is body or through[0][0] == body)
        ):
            return False
        edited = None
        if headers.changed:
            edited = paired_response_edit(as_read, headers)
            if edited is None:
                return False
        if chain.state is None and self.lanes.ends_with_response:
            self._let_go(chain)  # the filters' last word
        return edited

    def _late_response_hook(
        self, status: int, fields: list, content_length: int, body: bytes = b""
    ) -> bytes | list | bool | None:
        """The response hook of a chain with no request-header filter: start the request's
        chain now, its request header map built from the request's bytes only if read."""
        self.reply = None
        self.late_for = self.pair.served
        ctx = self.ctx
        factory: Any = self.lanes.chain
        if ctx.timed:
            t0 = perf_counter_ns()
            self.chain = chain = HttpChain(factory, self)
            chain.maps = maps = RequestLater()
            maps.request = self.pair.request
            factory.charge(ctx.block, perf_counter_ns() - t0)
        else:
            self.chain = chain = HttpChain(factory, self)
            chain.maps = maps = RequestLater()
            maps.request = self.pair.request
        return self._response_hook(status, fields, content_length, body)

    def _through_as_read(self, feed: Any, body: bytes) -> bool:
        """Feed the whole body to the chain's body filters (``feed``: its decode_data or
        encode_data) as the stream's end: True when they let it through as it came.
        ``through`` keeps what they let through, for an Exchange that takes the message."""
        through: list = []
        self.through = through
        passed, self.passed = self.passed, None  # a body filter that raises voids the pass
        feed(body, True)  # a chain of one filter runs its hook without the loop (HttpChain._one)
        self.passed = passed
        # Kept on success too: if the pair takes the message after all (a head it cannot
        # write), the Exchange must not feed the body to these filters again.
        if len(through) == 1:
            data, end_stream = through[0]
            return end_stream and (data is body or data == body)
        return False

    def _let_go(self, chain: HttpChain) -> None:
        """A passed chain with nothing left to run (no end-of-request hook, nothing held or
        deferred): its filters let go of it now, and the pair needs no done call. It is not
        ended: the pair may yet take the message, and an Exchange that adopts the chain then
        forwards what follows through it and ends it (running nothing more)."""
        chain.run_destroyers()
        self.pair.done_wanted = 0

    def _done_hook(self) -> None:
        chain, self.chain = self.chain, None
        if chain is not None:
            # The pair calls this once the response is sent: the filters' end-of-request work
            # (WASM's on_done/log/delete), which the general path defers past its corked send
            # (end_chain), can run now, without a loop callback per request.
            chain.destroy()

    # What the chain calls on its exchange while the lane stands in for one:
    def filter_local_reply(
        self, status: int, body: bytes, headers: list, grpc_status, flag: str, details: str
    ) -> None:
        self.reply = (status, body, headers, grpc_status, flag, details)

    def forward_response_head(self, end_stream: bool) -> None:
        """The response filters passed the head: the response hook answers for it."""

    # What the body filters let through while a hook feeds them a body (_through_as_read).
    def forward_request_body(self, data, end_stream: bool) -> None:
        through = self.through
        if through is None:
            _after_adoption()
        else:
            through.append((data, end_stream))

    forward_response_body = forward_request_body

    # The chain calls these only for trailers or a head or body a filter resumes: each happens
    # after an Exchange adopted the chain (Exchange.adopt_chain, adopt_sent).
    def headers_decoded(self) -> None:
        _after_adoption()

    def forward_request_trailers(self, headers) -> None:
        _after_adoption()

    def forward_response_trailers(self, headers) -> None:
        _after_adoption()

    # ---- what the pair hands over -------------------------------------------------------

    def _handover(self, kind: int, payload: Any) -> None:
        chain = self.chain  # a request taken carries it on
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
        elif kind == _express.REQUEST_TAKEN:
            self._request_taken(payload, chain)
        elif kind == _express.RESPONSE_TAKEN:
            self._response_taken(payload)
        # DOWN_READABLE, UP_IDLE_READABLE: nothing was read; the streams' own readers fire next.

    def _request_taken(self, data: bytes, chain: HttpChain | None) -> None:
        through, self.through = self.through, None
        if chain is None or self.passed is None:
            # The hook raised: its filters' pass is void, and the general path reads the
            # request afresh (a filter that raised there raises again, as it would have).
            if chain is not None:
                end_chain(self.ctx, chain)
            self.downstream.data_received(data)
            return
        self.downstream.take_request(data, self.route, chain, self.passed, self.reply, through)

    def _response_taken(self, data: bytes) -> None:
        # release() handed the request in flight, and its chain, to an Exchange.
        through, self.through = self.through, None
        exchange = self.downstream.exchange
        if through is not None and self.passed and exchange is not None:
            # Its head passed and its body went through the filters: the Exchange sends the
            # head and what they let through (what they hold, when they let it go), never the
            # body as read; an answer of theirs comes after the head, as on the general path.
            upstream = self.upstream
            upstream.answered = True
            events = upstream.decode(data)  # head, body, end: the codec's cycle is done
            downstream = exchange.downstream
            downstream.cork()
            try:
                exchange.response_fed(events[0], through)
                if self.reply is not None:
                    exchange.filter_local_reply(*self.reply)
            finally:
                downstream.uncork()
            return
        if self.reply is not None and exchange is not None:
            exchange.filter_local_reply(*self.reply)  # the upstream's answer is dropped
            return
        if self.passed is None and exchange is not None and exchange.chain is not None:
            # The hook raised: the Exchange runs the response filters over the head afresh.
            exchange.chain.maps.pop("encode", None)
        self.upstream.data_received(data)


class RequestLater(dict):
    """A late-started chain's ``maps``: its request header map ("decode"), as the request
    hook would have built it, made from the request's bytes as read only when something
    reads it (a response-header filter rarely does)."""

    __slots__ = ("request",)  # the request's bytes as read: set before use (no __init__ call)
    request: bytes

    def __missing__(self, key: str) -> HeaderMap:
        if key != "decode":
            raise KeyError(key)
        head: Any = make_http1_codec("fast", "server").receive_data(self.request)[0]
        headers = self["decode"] = HeaderMap(
            list(head.headers),
            {b":method": head.method, b":path": head.target, b":authority": authority_of(head)},
        )
        return headers

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key == "decode" else super().get(key, default)


def _after_adoption() -> None:
    raise RuntimeError("a chain the native lane ran calls its Exchange once one adopted it")
