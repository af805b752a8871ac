"""One request/response exchange: routes it, binds an upstream, streams both ways, maps every failure.

The exchange is the request's record (request.py) and the session between
its downstream and its upstream, which it only knows through seams.py, so
protocol versions can be mixed. Backpressure crosses here: when one side's
send buffer passes its high watermark the other side stops reading, and
resumes below the low watermark. Until an upstream is bound, the downstream
is paused and what was already parsed waits in a short list (at most one read).

A request and its response read whole go through here in one call each
(``send_whole`` upstream, ``response_whole`` back): the general path's
whole-message shortcut, which is also the way onto the native lane.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import Any, Protocol

from pyproxy.chain.api import RESET_STREAM, HeaderMap
from pyproxy.chain.http_chain import ChainClock, ChainFactory, ChainOwner, HttpChain
from pyproxy.codec.events import END, Body, RequestHead, ResponseHead, Trailers
from pyproxy.codec.grpc import DEADLINE_EXCEEDED
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.counters import REFUSED_REQUESTS
from pyproxy.http.context import HttpContext
from pyproxy.http.grpc_call import HTTP1_REFUSED, GrpcCall, wants_call
from pyproxy.http.heads import downstream_head, filtered_request, retryable, upstream_head
from pyproxy.http.local_reply import local_reply_head
from pyproxy.http.request import RequestRecord, authority_of
from pyproxy.http.seams import Attach, Downstream, Upstream
from pyproxy.protocol import has_body

OVERLOADED = b"overloaded: too many requests in progress\n"


class Exchange(RequestRecord):
    __slots__ = (
        "downstream",
        "upstream",
        "pending",
        "request_done",
        "response_started",
        "response_done",
        "retried",
        "attach",
        "chain",
        "head_only",
        "response_head_in",
        "grpc",
        "forwards_unchanged",
    )

    def __init__(
        self,
        ctx: HttpContext,
        downstream: Downstream,
        request: RequestHead,
        trace: list[int] | None,
    ) -> None:
        super().__init__(ctx, request, trace)
        self.downstream = downstream
        self.upstream: Upstream | None = None  # bound once acquired
        self.pending: list = []
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.retried = False
        self.attach: Attach | None = None
        self.chain: HttpChain | None = None  # when the route has filters
        self.response_head_in: Any = None  # the upstream's ResponseHead once it arrived
        self.grpc: GrpcCall | None = None  # for gRPC requests
        # The response leaves as it came unless a filter, gRPC or Server-Timing needs a say
        # (set once the request is on its way upstream).
        self.forwards_unchanged = False
        # No body follows the request head (Envoy's end_stream on decode_headers).
        self.head_only = not request.chunked and not request.content_length and not request.upgrade

    # ---- request side (called by the downstream) -----------------------------

    def start(self) -> None:
        request = self.request
        if wants_call(self):
            self.grpc = GrpcCall(self)
        elif self.ctx.grpc_only:
            self.local_reply(505, HTTP1_REFUSED, "DPE")
            return
        if not self.ctx.admission.admit_request():
            # Overloaded: answer now rather than queue (gRPC: 503 is UNAVAILABLE, trailers-only).
            self.ctx.block[REFUSED_REQUESTS] += 1
            self.local_reply(503, OVERLOADED, "UO")
            return
        self.admitted = True
        authority = authority_of(request)
        route = self.ctx.router.match(authority, request.target)
        if route is None:
            self.local_reply(404, b"no route\n", "NR")
            return
        self.route = route
        chain_factory = self.ctx.chain_for(route)
        if chain_factory is None:
            self.headers_decoded()
            return
        passed = start_chain(
            self, chain_factory, request.method, request.target, request.headers, authority,
            self.head_only,
        )  # fmt: skip
        if passed:
            self.headers_decoded()
        else:
            self.hold_if_chain_holds()

    def hold_if_chain_holds(self) -> None:
        """A filter holds the head: stop reading (unless it buffers the body: then it reads on)."""
        chain = self.chain
        if chain is None or self.finished:  # the chain ended the request (a local reply)
            return
        if chain.state is None or chain.state.body_for["decode"] is None:
            self.downstream.pause_request()

    def headers_decoded(self) -> None:
        """Every filter let the request head through: pick the upstream and go."""
        if self.finished:
            return
        chain = self.chain
        if chain is not None:
            if chain.route_cleared and chain.current_route() is None:  # matched again: none
                self.local_reply(404, b"no route\n", "NR")
                return
            self.request = filtered_request(self.request, chain.maps["decode"])
        route = self.route
        if route.cluster is not None:
            self.target = route.cluster.pick()
        else:
            self.target, self.source = self.downstream.default_target()
        self.forwards_unchanged = self._forwards_unchanged()
        timeout = route.grpc_timeout if self.grpc is not None else route.timeout
        if timeout > 0:  # router.py's rule: while the body still arrives, it bounds silence
            self.arm_timeout(timeout, restarts=not (self.head_only or self.request_done))
        self._acquire()

    def refresh_route(self, headers: HeaderMap) -> None:
        """Match the route again from the request head as the filters left it (a filter cleared
        the route cache): its cluster, timeout, name and metadata apply from now on; the filters
        already running stay. No route matching leaves None (the request then gets 404)."""
        host = headers.get(b"host")
        authority = headers.pseudo.get(b":authority") or b""
        if host is not None and authority == authority_of(self.request):
            authority = host  # the pseudo-header is unchanged: a filter may have set Host
        self.route = self.ctx.router.match(authority, headers.pseudo.get(b":path") or b"")

    def _forwards_unchanged(self) -> bool:
        chain = self.chain
        return (
            self.grpc is None
            and (chain is None or not chain.factory.encodes)
            and not (self.ctx.settings.server_timing and self.trace is not None)
        )

    def _acquire(self) -> None:
        cluster = (
            self.route.cluster
            if self.route.cluster is not None
            else self.ctx.router.default_cluster
        )
        self.attach = self.ctx.pool.acquire(
            self.target, self.source, cluster, self._attached, self._connect_failed
        )
        if self.upstream is None and not self.finished:
            self.downstream.pause_request()  # a connect is in flight: hold the request body

    def request_body(self, data) -> None:
        self.bytes_in += len(data)
        if self.timeout_restarts:
            self.restart_timeout()
        if self.grpc is not None and not self.grpc.request_data(data):
            return
        chain = self.chain
        if chain is not None and chain.factory.decodes_body:
            chain.decode_data(data, False)
        else:
            self._to_upstream(Body(data))

    def request_trailers(self, headers) -> None:
        chain = self.chain
        if chain is not None and chain.factory.decodes_body:
            chain.decode_trailers(headers)
        else:
            self._to_upstream(Trailers(headers))

    def request_end(self) -> None:
        self.request_done = True
        if self.finished or (self.grpc is not None and not self.grpc.request_ended()):
            return
        if self.timeout_restarts:
            # The whole request is in: the whole response is due within the timeout from now.
            self.restart_timeout()
            self.timeout_restarts = False
        chain = self.chain
        if self.head_only:
            return  # its end went upstream with its head
        if chain is not None and chain.factory.decodes_body:
            chain.decode_data(b"", True)
        else:
            self._to_upstream(END)

    # What the chain lets through, toward the upstream:
    def forward_request_body(self, data, end_stream: bool) -> None:
        if data:
            self._to_upstream(Body(data))
        if end_stream:
            self._to_upstream(END)

    def forward_request_trailers(self, headers) -> None:
        self._to_upstream(Trailers(headers))
        self._to_upstream(END)

    def _to_upstream(self, event) -> None:
        if self.finished:
            return
        if self.upstream is None:
            self.pending.append(event)
        else:
            self.upstream.send(event)

    def downstream_reset(self) -> None:
        """The downstream went away mid-exchange: abandon the upstream side too."""
        if self.finished:
            return
        self._abandon_upstream()
        self._finish("DR", reset_downstream=False)

    def request_malformed(self, status: int, body: bytes) -> None:
        """The request body turned out malformed (a bad chunk): the upstream, which has the head
        already, is reset so the request never completes there; the client hears why (status
        0: its stream was reset, as HTTP/2 answers a malformed message)."""
        if self.finished:
            return
        self._abandon_upstream()
        if self.response_started or not status:
            self._finish("DPE", reset_downstream=True)
        else:
            self.local_reply(status, body, "DPE")

    def downstream_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_response()

    def downstream_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_response()

    # ---- binding the upstream ------------------------------------------------

    def _attached(self, upstream: Upstream) -> None:
        self.attach = None
        if self.finished:
            self.ctx.pool.release(upstream)
            return
        self.upstream = upstream
        upstream.bind(self)
        head = upstream_head(self.request, upstream.multiplexed)
        if self.head_only:
            # A bodyless request is complete with its head: both leave together.
            upstream.send_whole(head)
        else:
            upstream.send(head)
            for event in self.pending:
                upstream.send(event)
            self.pending.clear()
        self.downstream.resume_request()

    def adopt_chain(self, route, chain: HttpChain, passed: bool, reply: tuple | None) -> None:
        """Carry on a request whose head the native lane ran through ``chain`` and did not send
        (a filter held it or answered, or its new head needs this path): as ``start`` goes on
        after ``start_chain`` returned ``passed``; ``reply``: the filter's local reply."""
        self.route = route
        self.chain = chain
        chain.exchange = self
        if reply is not None:
            self.filter_local_reply(*reply)
        elif passed:
            self.headers_decoded()
        else:
            self.hold_if_chain_holds()

    def adopt_fed(
        self, route, chain: HttpChain, reply: tuple | None, body_len: int, through: list
    ) -> None:
        """Carry on a whole request whose head passed ``chain`` in the native lane and whose
        body (``body_len`` bytes) it ran through the body filters too, which let ``through``
        go on so far ((data, end_stream) pairs; a body they hold goes on when they resume):
        the request is all read, and the body is not fed to them again."""
        self.request_done = True
        self.bytes_in += body_len
        self.adopt_chain(route, chain, True, reply)
        for data, end_stream in through:
            self.forward_request_body(data, end_stream)

    def adopt_sent(
        self, route, upstream, body, started_ns: int, chain: HttpChain | None,
        late: ChainFactory | None = None,
    ) -> None:  # fmt: skip
        """Carry on a whole request the native lane read at ``started_ns`` and already sent on
        ``upstream`` (an HTTP/1 connection), with its filters' ``chain`` if its route has one:
        its response, timeout and accounts are ours now. ``late``: the route's filters (none
        of them request-header ones) whose chain the lane had not started yet: it starts here,
        as ``start`` would have started it."""
        self.started_ns = started_ns
        self.route = route
        if late is not None:
            request = self.request
            start_chain(
                self, late, request.method, request.target, request.headers,
                authority_of(request), self.head_only,
            )  # fmt: skip
        elif chain is not None:
            self.chain = chain
            chain.exchange = self
            self.request = filtered_request(self.request, chain.maps["decode"])
        self._adopt_upstream(upstream, upstream.key, route.timeout)
        # The upstream codec learns what was sent; the bytes themselves are already out.
        upstream.codec.send_message(upstream_head(self.request, False), body)

    def adopt_call(self, route, upstream, started_ns: int, messages: int) -> None:
        """Carry on a gRPC call the gRPC lane read at ``started_ns`` and sent whole (``messages``
        request messages) on ``upstream``, a stream of the lane's HTTP/2 connection, before any
        of its response went downstream: its response, deadlines and accounts are ours now."""
        self.started_ns = started_ns
        self.route = route
        self.grpc = GrpcCall(self, started_ns)
        self.grpc.requests.messages = messages
        self._adopt_upstream(upstream, upstream.session.key, route.grpc_timeout)

    def _adopt_upstream(self, upstream, target, timeout: float) -> None:
        """The adopted request is all sent on ``upstream``: bind it, with the route timeout
        counted from when the lane read the request."""
        self.target, self.source = target, ""
        self.request_done = True
        self.forwards_unchanged = self._forwards_unchanged()
        if timeout > 0:
            left = timeout - (perf_counter_ns() - self.started_ns) / 1e9
            self.arm_timeout(timeout, restarts=False, due=self.ctx.loop.time() + left)
        self.upstream = upstream
        upstream.bind(self)

    def _connect_failed(self, flag: str) -> None:
        self.attach = None
        if not self.finished:
            self.local_reply(503, b"upstream connect error\n", flag)

    # ---- response side (called by the upstream connection) ------------------------

    def response_head(self, head: ResponseHead) -> None:
        if head.status < 200 and head.status != 101:
            self.downstream.send_interim(head)
            return
        self.status = head.status
        self.response_head_in = head
        if self.grpc is not None:
            self.grpc.response_headers(head.headers)  # trailers-only: the status is in the head
        elif self.timeout and head.content_length is None and head.status != 101:
            self.timeout_restarts = True  # a response of no set length is a stream
        chain = self.chain
        if chain is not None and chain.factory.encodes and head.status != 101:
            if "encode" in chain.maps:
                # The native lane ran this head through the filters before handing it over.
                if not (chain.replied or chain.holds("encode")):
                    self.forward_response_head(False)
                return
            headers = HeaderMap(strip_hop_by_hop(head.headers), {b":status": b"%d" % head.status})
            chain.encode_headers(headers, False)
        else:
            self.forward_response_head(False)

    def response_whole(self, head: ResponseHead, body) -> bool:
        """A whole response read at once, nothing to change: straight to the downstream.

        Only for heads carrying their wire bytes (final, length-framed HTTP/1.1); False
        when the downstream cannot take it whole, and the events go the usual way.
        """
        if head.wire is None or head.status < 200:
            return False
        # The downstream sends the wire bytes (or strips the list if it cannot use them).
        if not self.downstream.send_whole(head, body):
            return False
        self.status = head.status
        self.response_head_in = head
        self.response_started = self.response_done = True
        self.bytes_out += len(body)
        self._finish("")
        return True

    def response_fed(self, head: ResponseHead, through: list) -> None:
        """A whole response the native lane ran through the chain, head and body, and did not
        send: the head passed, and the body filters let ``through`` go on so far ((data,
        end_stream) pairs; a body they hold goes on when they resume, through this exchange).
        The upstream is done with it."""
        self.status = head.status
        self.response_head_in = head
        self.response_done = True
        self.forward_response_head(False)
        for data, end_stream in through:
            self.forward_response_body(data, end_stream)

    def forward_response_head(self, end_stream: bool) -> None:
        chain = self.chain
        filtered = chain.maps["encode"] if chain is not None and "encode" in chain.maps else None
        timing = self.trace if self.ctx.settings.server_timing else None
        head = downstream_head(self.response_head_in, self.request.method, filtered, timing)
        self.response_started = True
        self.status = head.status
        self.downstream.send_head(head)
        if head.status == 101:
            self._switch_protocols()

    def response_body(self, data) -> None:
        if self.timeout_restarts:
            self.restart_timeout()
        if self.grpc is not None and not self.grpc.response_data(data):
            return
        chain = self.chain
        if chain is not None and chain.factory.encodes:
            chain.encode_data(data, False)
        else:
            self.forward_response_body(data, False)

    def response_trailers(self, headers) -> None:
        if self.grpc is not None:
            self.grpc.response_headers(headers)
        chain = self.chain
        if chain is not None and chain.factory.encodes:
            chain.encode_trailers(headers)
        else:
            self.forward_response_trailers(headers)

    def response_end(self) -> None:
        if self.grpc is not None and not self.grpc.response_ended():
            return
        self.response_done = True
        chain = self.chain
        if chain is not None and chain.factory.encodes:
            chain.encode_data(b"", True)
        else:
            self.forward_response_body(b"", True)

    def forward_response_body(self, data, end_stream: bool) -> None:
        # A filter may have made the response one that carries no body (a 204, say): drop it.
        if data and has_body(self.status, self.request.method):
            self.bytes_out += len(data)
            self.downstream.send_body(data)
        if end_stream:
            self.downstream.send_end()
            self._finish("")

    def forward_response_trailers(self, headers) -> None:
        self.response_done = True  # trailers end the response: its upstream may be reused
        self.downstream.send_trailers(headers)
        self.downstream.send_end()
        self._finish("")

    def filter_local_reply(
        self, status: int, body: bytes, headers: list, grpc_status, flag: str, details: str
    ) -> None:
        """A filter answers instead of the upstream (fault abort, rate limit, script reply), or
        resets the stream (RESET_STREAM)."""
        if self.finished:
            return
        self._abandon_upstream()
        if self.response_started or status == RESET_STREAM:
            self._finish(flag, reset_downstream=True)  # the head is out: all we can do is reset
            return
        self.local_reply(status, body, flag, headers, grpc_status, details)

    def upstream_failed(self, flag: str) -> None:
        """The upstream connection broke (reset, EOF mid-response, protocol error)."""
        upstream, self.upstream = self.upstream, None
        if self.finished:
            return
        if not self.response_started:
            if flag == "UC" and upstream is not None and upstream.retry_safe and self._retryable():
                # The pooled connection was closed by the app just as we reused it: try once more.
                # Never after a protocol error or once response bytes came: the app has the request.
                self.retried = True
                self._acquire()
                return
            status = 502 if flag == "UPE" else 503
            self.local_reply(
                status, b"upstream connect error or disconnect/reset before headers\n", flag
            )
            return
        self._finish("UR" if flag == "UC" else flag, reset_downstream=True)

    def upstream_write_paused(self) -> None:
        self.downstream.pause_request()

    def upstream_write_resumed(self) -> None:
        self.downstream.resume_request()

    def _retryable(self) -> bool:
        return not self.retried and retryable(self.request)

    def _switch_protocols(self) -> None:
        upstream, self.upstream = self.upstream, None
        assert upstream is not None, "a 101 comes from the bound upstream"
        self._finish("", switched=True)
        self.downstream.switch_to_tunnel(upstream)

    # ---- ending ----------------------------------------------------------------

    def fail_call(self, grpc_status: int, message: str, flag: str) -> None:
        """gRPC: end the call with a status of ours (deadline, bad framing, message too large).

        The upstream stream is cancelled (RST_STREAM CANCEL). Before the response
        started the caller gets a trailers-only reply; after, trailers if every
        message relayed so far is whole, else a stream reset (the connection stays).
        """
        grpc = self.grpc
        assert grpc is not None, "fail_call ends gRPC calls"
        if self.finished:
            return
        self._abandon_upstream()
        if not self.response_started:
            self.local_reply(200, b"", flag, grpc_status=grpc_status, details=message)
        elif grpc.response_at_boundary and not self.response_done:
            self.response_done = True
            self.downstream.send_trailers(grpc.status_trailers(grpc_status, message))
            self.downstream.send_end()
            self._finish(flag)
        else:
            grpc.status = grpc_status
            self._finish(flag, reset_downstream=True)

    def _abandon_upstream(self) -> None:
        """Stop a pending connect, or reset the bound upstream stream/connection."""
        if self.attach is not None:
            self.attach.cancel()
            self.attach = None
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None

    def deadline_expired(self) -> None:
        """The route timeout passed (called by the context's Deadlines)."""
        self.timeout = 0.0
        self.timeout_restarts = False
        if self.finished:
            return
        if self.grpc is not None:
            # A call ends with a status the caller can read, trailers once the response started.
            self.fail_call(DEADLINE_EXCEEDED, "route timeout at the sidecar", "UT")
            return
        self._abandon_upstream()
        if self.response_started:
            self._finish("UT", reset_downstream=True)  # a stream stalled: all we can do is reset
        elif not self.request_done and not self.head_only:
            self.local_reply(408, b"request body timeout\n", "SI")  # the upload went silent
        else:
            self.local_reply(504, b"upstream request timeout\n", "UT")

    def local_reply(
        self, status: int, body: bytes, flag: str, extra_headers: list | None = None,
        grpc_status: int | None = None, details: str = "",
    ) -> None:  # fmt: skip
        """Answer the downstream ourselves; the connection closes if the request was not fully read."""
        self.response_started = True
        if self.grpc is not None:
            # gRPC: trailers-only (one HEADERS frame with END_STREAM); the text goes in grpc-message.
            message = details or body.decode("utf-8", "replace").strip()
            head = self.grpc.local_reply_head(status, flag, grpc_status, message, extra_headers)
            self.status = 200
            self.response_done = True
            self.downstream.send_head(head)
            self.downstream.send_end()
            self._finish(flag)
            return
        self.status = status
        # A bodyless request is complete with its head: answering early need not cost the connection.
        keep = (self.request_done or self.head_only) and self.request.keep_alive
        head = local_reply_head(status, len(body), keep)
        if extra_headers:
            # A filter's own content-type replaces the default one.
            if any(name == b"content-type" for name, _ in extra_headers):
                head.headers[:] = [h for h in head.headers if h[0] != b"content-type"]
            head.headers.extend(extra_headers)
        self.downstream.send_head(head)
        if body and has_body(status, self.request.method):
            self.bytes_out += len(body)
            self.downstream.send_body(body)
        self.response_done = True
        self.downstream.send_end()
        self._finish(flag)

    def _finish(self, flag: str, reset_downstream: bool = False, switched: bool = False) -> None:
        if self.finished:
            return
        elapsed = self.account_end(flag)
        ctx = self.ctx
        if self.grpc is not None:
            self.grpc.finished(flag, elapsed)
        upstream, self.upstream = self.upstream, None
        if upstream is not None and not switched:
            if self.request_done and self.response_done:
                ctx.pool.release(upstream)
            else:
                upstream.abort()
        chain = self.chain
        if chain is not None:
            self.chain = None  # no exchange <-> chain cycle left behind
            end_chain(ctx, chain)
        if ctx.access_log is not None:
            metadata = chain.dynamic_metadata if chain is not None else None
            record = self.log_record(self.downstream.protocol, elapsed, metadata, self.grpc)
            ctx.access_log.write(ctx.loop, record)
        if not switched:
            self.downstream.exchange_done(self, reset=reset_downstream)


class ChainHolder(ChainOwner, Protocol):
    """What starts a chain: the Exchange (or a bench's stand-in). It holds its chain before
    the first hook runs, since hooks call back into it."""

    chain: HttpChain | None


def start_chain(
    owner: ChainHolder, factory: ChainFactory, method: bytes, target: bytes, headers, authority: bytes,
    end_stream: bool,
) -> bool:  # fmt: skip
    """Start a request's filter chain (``owner.chain``) and run its request-header pass.

    The owner is the Exchange, or a request the native lane carries. True when every
    filter let the head through. The chain's own set-up and run loop are part of what
    filters cost: measured here and charged to their stages (a local reply's too).
    """
    ctx = owner.ctx
    timed = ctx.timed
    if timed:
        t0 = perf_counter_ns()
    owner.chain = chain = HttpChain(factory, owner)
    # The head's header list belongs to this request: filters edit it in place, no copy.
    passed = chain.decode_headers(
        HeaderMap(headers, {b":method": method, b":path": target, b":authority": authority}),
        end_stream,
    )
    if timed:
        spent = perf_counter_ns() - t0 - chain.hook_ns
        if factory.single:  # charge's case, without the call
            if spent > 0:
                ctx.block[factory.stage_ns[0]] += spent
        else:
            factory.charge(ctx.block, spent)
    return passed


def end_chain(ctx: ChainClock, chain: HttpChain) -> None:
    """The request is over: its filters' end-of-request work."""
    if chain.factory.destroyers:
        # Filters' end-of-request work (WASM on_done/on_delete) runs after the response has
        # left: a corked response is only sent when the current call unwinds.
        chain.done = True
        ctx.loop.call_soon(chain.run_destroyers)
    else:
        chain.destroy()
