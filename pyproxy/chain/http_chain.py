"""Runs an HTTP filter chain for one request: hooks in order, stop/resume, bounded buffering, timing.

The exchange hands request events to `decode_*` and response events to
`encode_*`; each returns whatever must travel on (or nothing while a filter
holds the direction). A stopped filter resumes its direction with
`callbacks.continue_decoding()` / `continue_encoding()`; the chain then
replays what it held, in order, from the next filter on.

The chain object is also every filter's `callbacks` for its request: no
per-filter callbacks object. Filters that keep no per-request state
(`HttpFilter.shared`) are made once per worker and reused by every request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from time import perf_counter_ns
from typing import Any, Protocol

from pyproxy.chain.api import (
    CONTINUE,
    RESET_STREAM,
    STOP_AND_BUFFER,
    FactoryContext,
    HeaderMap,
    HttpFilter,
)
from pyproxy.chain.registry import factory_class
from pyproxy.config import FilterSpec
from pyproxy.counters import FILTER_STAGE_BASE, STAGE_EVENTS, STAGE_NS

DEFAULT_BUFFER_LIMIT = (
    1024 * 1024
)  # STOP_AND_BUFFER beyond this answers 413 (request) or 500 (response)
HOOKS = (
    "decode_headers",
    "decode_data",
    "decode_trailers",
    "encode_headers",
    "encode_data",
    "encode_trailers",
)


class ChainClock(Protocol):
    """What the chain reads of its listener's HTTP context: the loop and where stages count."""

    @property
    def loop(self) -> Any: ...
    @property
    def timed(self) -> bool: ...
    @property
    def block(self) -> memoryview: ...


class ChainDownstream(Protocol):
    """The side a request came from, as the chain (and a filter) may touch it."""

    @property
    def protocol(self) -> str: ...
    def resume_request(self) -> None: ...


class ChainOwner(Protocol):
    """The exchange as its filter chain sees it (pyproxy/http/exchange.py): where what the
    filters let through goes. The chain sits below the HTTP layer and never imports it."""

    @property
    def ctx(self) -> ChainClock: ...
    @property
    def downstream(self) -> ChainDownstream: ...
    def headers_decoded(self) -> None: ...
    def forward_request_body(self, data, end_stream: bool) -> None: ...
    def forward_request_trailers(self, headers) -> None: ...
    def forward_response_head(self, end_stream: bool) -> None: ...
    def forward_response_body(self, data, end_stream: bool) -> None: ...
    def forward_response_trailers(self, headers) -> None: ...
    def filter_local_reply(
        self, status: int, body: bytes, headers: list, grpc_status, flag: str, details: str
    ) -> None: ...


class ChainFactory:
    """Built once per worker for a listener or a route: factories plus, per hook, who implements it."""

    def __init__(
        self, specs: tuple[FilterSpec, ...], context: FactoryContext, slot_of: dict[str, int]
    ) -> None:
        self.factories = []
        for spec in specs:
            context.filter_name = spec.name
            self.factories.append(factory_class(spec.type)(spec.config, context))
        self.names = [spec.name for spec in specs]
        self.stage_ns = [STAGE_NS + FILTER_STAGE_BASE + slot_of[spec.name] for spec in specs]
        self.stage_events = [
            STAGE_EVENTS + FILTER_STAGE_BASE + slot_of[spec.name] for spec in specs
        ]
        classes = [factory.filter_class for factory in self.factories]

        def implementing(hook: str) -> tuple[tuple, ...]:
            # Encoders run in reverse chain order (Envoy's rule: the first filter sees the response last).
            order: Iterable[int] = range(len(classes))
            if hook.startswith("encode"):
                order = reversed(range(len(classes)))
            # (index, the class's function, its stage slots): no attribute lookup by name per call.
            return tuple(
                (i, fn, self.stage_ns[i], self.stage_events[i])
                for i in order
                if (fn := getattr(classes[i], hook, None)) is not None
            )

        self.hooks = {hook: implementing(hook) for hook in HOOKS}
        self.decode_heads = self.hooks["decode_headers"]  # read once per request
        overrides = [
            getattr(cls, "on_destroy", None) is not HttpFilter.on_destroy for cls in classes
        ]
        # Filters without per-request state: one instance per worker (see HttpFilter.shared).
        self.shared: tuple[HttpFilter | None, ...] = tuple(
            factory.create() if getattr(cls, "shared", False) else None
            for factory, cls in zip(self.factories, classes, strict=True)
        )
        for i, instance in enumerate(self.shared):
            if instance is not None and overrides[i]:
                raise TypeError(f"{classes[i].__name__}: a shared filter cannot define on_destroy")
        self.shared_instances = tuple(s for s in self.shared if s is not None)
        self.all_shared = len(self.shared_instances) == len(classes)
        self.creators = tuple(
            (i, factory.create)
            for i, factory in enumerate(self.factories)
            if self.shared[i] is None
        )
        # on_destroy is a hook too (WASM/Lua contexts end there): called and timed only where
        # overridden. `destroyers` (what the exchange checks) are those whose work should wait
        # until the response has left (HttpFilter.defer_destroy); the others run at once.
        self.finishers = tuple(i for i in range(len(classes)) if overrides[i])
        self.destroyers = tuple(
            i for i in self.finishers if getattr(classes[i], "defer_destroy", False)
        )
        self.decodes_body = bool(self.hooks["decode_data"] or self.hooks["decode_trailers"])
        self.encodes = any(
            self.hooks[h] for h in ("encode_headers", "encode_data", "encode_trailers")
        )
        # Only heads are filtered (no body or trailer hook): the native pair's hooks need not
        # be handed the bodies of the whole messages it carries (pyproxy/http/native_lane.py).
        self.heads_only = not (
            self.decodes_body or self.hooks["encode_data"] or self.hooks["encode_trailers"]
        )
        # With one filter, the exchange's clock around the whole decode pass (set-up included)
        # is that filter's cost: the chain reads no clock in that pass.
        self.single = len(classes) == 1
        # One filter with state per request: made without the general set-up's list and loop.
        self.create_one = self.creators[0][1] if self.single and self.creators else None
        # One filter with both response hooks: a message the native lane holds whole goes
        # through them in one step (encode_whole): (head hook, body hook, stage slots).
        self.whole: tuple[Any, Any, int, int] | None = None
        if self.single and self.hooks["encode_headers"] and self.hooks["encode_data"]:
            _, head, ns_slot, events_slot = self.hooks["encode_headers"][0]
            self.whole = (head, self.hooks["encode_data"][0][1], ns_slot, events_slot)
        # One filter with per-request state whose on_destroy is all its end-of-request work:
        # destroy calls it without run_destroyers' loops.
        self.one_finisher = self.create_one is not None and self.finishers == (0,)

    def start(self, exchange: ChainOwner) -> HttpChain:
        return HttpChain(self, exchange)

    def charge(self, block, overhead_ns: int) -> None:
        """Share the chain's own per-request work (set-up, run loop) among its filters' stages."""
        if overhead_ns <= 0:
            return
        stage_ns = self.stage_ns
        if self.single:
            block[stage_ns[0]] += overhead_ns
            return
        share = overhead_ns // len(stage_ns)
        for slot in stage_ns:
            block[slot] += share

    def close(self) -> None:
        for factory in self.factories:
            factory.close()


class _ChainState:
    """Where a direction stopped and what it holds: only built once some filter stops (rare)."""

    __slots__ = ("stopped", "held", "held_body", "body_for", "cleanups", "stopped_trailers")

    def __init__(self) -> None:
        # Per direction: position in the hook list where a filter stopped, and the events held since.
        self.stopped: dict[str, tuple[str, int] | None] = {"decode": None, "encode": None}
        self.held: dict[str, list] = {"decode": [], "encode": []}
        self.held_body: dict[str, list[bytes]] = {"decode": [], "encode": []}
        # Per direction: the filter that stopped the headers with STOP_AND_BUFFER and wants the
        # whole body (its data hook is called once, at the end) before the headers move on.
        self.body_for: dict[str, int | None] = {"decode": None, "encode": None}
        # (filter index, function): end-of-request work a filter asked for (defer_cleanup).
        self.cleanups: list[tuple[int, Callable[[], None]]] = []
        # Per direction: the trailers a filter stopped on, to go on with when it resumes.
        self.stopped_trailers: dict[str, list | None] = {"decode": None, "encode": None}


class HttpChain:
    """One request's pass through the chain, in both directions; also its filters' callbacks."""

    __slots__ = (
        "factory",
        "exchange",
        "filters",
        "maps",
        "state",
        "done",
        "replied",
        "hook_ns",
        "dynamic_metadata",
        "chunk",
        "route_cleared",
    )

    def __init__(self, factory: ChainFactory, exchange: ChainOwner) -> None:
        self.factory = factory
        self.exchange = exchange
        create = factory.create_one
        if create is not None:
            instance = create()
            instance.callbacks = self
            self.filters: tuple | list = (instance,)
        elif factory.all_shared:
            self.filters = factory.shared
        else:
            self.filters = filters = list(factory.shared)
            for index, create in factory.creators:
                instance = filters[index] = create()
                instance.callbacks = self
        self.state: _ChainState | None = None  # built on the first stop (see _ChainState)
        self.done = False
        self.replied = False
        # Time inside filter hooks (timed): the exchange charges the rest of the chain's time.
        self.hook_ns = 0
        # Envoy's dynamic metadata: {namespace: {key: value}}, shared by the request's filters.
        self.dynamic_metadata: dict | None = None
        # What a data hook asked to pass on (or hold) instead of the chunk it was given.
        self.chunk: bytes | None = None
        # A filter cleared the route cache: the route is matched again before it is used.
        self.route_cleared = False

    def _st(self) -> _ChainState:
        state = self.state
        if state is None:
            state = self.state = _ChainState()
        return state

    def holds(self, direction: str) -> bool:
        """A filter stopped this direction ("decode" or "encode") and has not resumed it."""
        state = self.state
        return state is not None and state.stopped[direction] is not None

    @property
    def held_body(self) -> dict[str, list[bytes]]:
        return self._st().held_body

    # ---- entry points (from the exchange) ---------------------------------------------

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> bool:
        """True when every filter let the headers through (the exchange may go upstream now)."""
        self.maps = {"decode": headers}
        factory = self.factory
        entries = factory.decode_heads
        if not entries and self.state is None:
            return not (self.replied or self.done)  # no request-header filter: nothing to run
        # With one filter, start_chain's clock around this pass is that filter's whole cost.
        if factory.single and self.state is None:
            return self._one("decode", "headers", entries[0], headers, end_stream, False)
        return self._run("decode", "headers", entries, headers, end_stream, 0)

    def decode_data(self, data, end_stream: bool) -> None:
        if self.state is None:  # nothing held: straight to the hooks, or through if none
            factory = self.factory
            entries = factory.hooks["decode_data"]
            if entries:
                if factory.single:
                    self._one("decode", "data", entries[0], data, end_stream, True)
                else:
                    self._run("decode", "data", entries, data, end_stream, 0)
            elif not (self.replied or self.done):
                self.exchange.forward_request_body(data, end_stream)
            return
        self._feed("decode", "data", data, end_stream)

    def decode_trailers(self, trailers) -> None:
        self._feed("decode", "trailers", trailers, True)

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> bool:
        self.maps["encode"] = headers
        factory = self.factory
        entries = factory.hooks["encode_headers"]
        if factory.single and entries and self.state is None:
            return self._one("encode", "headers", entries[0], headers, end_stream, True)
        return self._run("encode", "headers", entries, headers, end_stream, 0)

    def encode_data(self, data, end_stream: bool) -> None:
        if self.state is None:  # nothing held: straight to the hooks, or through if none
            factory = self.factory
            entries = factory.hooks["encode_data"]
            if entries:
                if factory.single:
                    self._one("encode", "data", entries[0], data, end_stream, True)
                else:
                    self._run("encode", "data", entries, data, end_stream, 0)
            elif not (self.replied or self.done):
                self.exchange.forward_response_body(data, end_stream)
            return
        self._feed("encode", "data", data, end_stream)

    def encode_trailers(self, trailers) -> None:
        self._feed("encode", "trailers", trailers, True)

    def encode_whole(self, headers: HeaderMap, body) -> int:
        """A whole response (head, then ``body`` as the stream's end) through a chain of one
        filter with both response hooks (``factory.whole``) while nothing is held: the native
        lane's response pass, as encode_headers then encode_data run it (each hook counted as
        its own event, their time charged together), in one step. 0: the head did not go on; 1: it did, and what the
        body hook let through went to the owner's forward_response_body as encode_data sends
        it; 2: both went on, the body as it came (sent nowhere: the caller carries it on).
        The owner's forward_response_head is not called: the caller sends the head."""
        self.maps["encode"] = headers
        if self.replied or self.done:
            return 0
        whole = self.factory.whole
        assert whole is not None, "called only for a chain of one filter with both hooks"
        head, feed, ns_slot, events_slot = whole
        instance = self.filters[0]
        instance.callbacks = self
        ctx = self.exchange.ctx
        timed = ctx.timed
        # Timed as the two hooks they are (two events), the stage charged once when both ran:
        # each memoryview update of the stage block costs about as much as a line of the hook.
        if timed:
            t = perf_counter_ns()
        status = head(instance, headers, False)
        if self.replied or status != CONTINUE or self.done:
            if timed:
                self._charge_hooks(ctx.block, ns_slot, events_slot, perf_counter_ns() - t, 1)
            if self.replied:
                return 0
            if status != CONTINUE:
                self._stopped("encode", "headers", headers, False, 0, 0, status, False)
                return 0
            if self.state is not None:
                self.state.stopped["encode"] = None
            return 1  # done: as encode_data would, nothing runs, nothing goes on
        if self.state is not None:
            self.state.stopped["encode"] = None
        status = feed(instance, body, True)
        if timed:
            spent = perf_counter_ns() - t
            block = ctx.block
            block[ns_slot] += spent
            block[events_slot] += 2
            self.hook_ns += spent
        data = body
        if self.chunk is not None:
            data, self.chunk = self.chunk, None
        if self.replied:
            return 1
        if status != CONTINUE:
            self._stopped("encode", "data", data, True, 0, 0, status, False)
            return 1
        if self.state is not None:
            self.state.stopped["encode"] = None
        if data is body:
            return 2
        self.exchange.forward_response_body(data, True)
        return 1

    def _charge_hooks(self, block, ns_slot: int, events_slot: int, spent: int, events: int) -> None:
        block[ns_slot] += spent
        block[events_slot] += events
        self.hook_ns += spent

    # ---- callbacks (what a filter may call for its request) -------------------------

    @property
    def loop(self):
        return self.exchange.ctx.loop

    def continue_decoding(self) -> None:
        self.resume("decode")

    def continue_encoding(self) -> None:
        self.resume("encode")

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        headers=(),
        grpc_status: int | None = None,
        flag: str = "LR",
        details: str = "",
    ) -> None:
        self.local_reply(status, body, list(headers), grpc_status, flag, details)

    def clear_route_cache(self) -> None:
        """Envoy's clearRouteCache: the request's route is matched again, from its head as the
        filters leave it, the next time it is used (at the latest, before it goes upstream)."""
        self.route_cleared = True

    def current_route(self) -> Any:
        """The request's route, matched again first if a filter cleared the route cache."""
        exchange = self.exchange
        if self.route_cleared:
            self.route_cleared = False
            refresh = getattr(exchange, "refresh_route", None)  # a stand-in owner has no router
            if refresh is not None:
                refresh(self.maps["decode"])
        return getattr(exchange, "route", None)

    def reset_stream(self, flag: str = "LR", details: str = "") -> None:
        """Reset the request's stream instead of answering it (downstream and upstream)."""
        self.local_reply(RESET_STREAM, b"", [], None, flag, details)

    def decoding_buffer(self) -> bytes:
        return b"".join(self._st().held_body["decode"])

    def encoding_buffer(self) -> bytes:
        return b"".join(self._st().held_body["encode"])

    def set_decoding_buffer(self, data: bytes) -> None:
        """Replace the buffered request body (the filter updates content-length itself)."""
        self._st().held_body["decode"][:] = [bytes(data)]

    def set_encoding_buffer(self, data: bytes) -> None:
        self._st().held_body["encode"][:] = [bytes(data)]

    def replace_data(self, data: bytes) -> None:
        """From a data hook: `data` goes on (or is held, if the hook stops) instead of the chunk
        it was given. Whatever the direction held before is the hook's to keep or drop (clear
        `held_body[direction]` to replace the whole buffered body)."""
        self.chunk = data

    def held_trailers(self, direction: str) -> list[tuple[bytes, bytes]] | None:
        """The trailers held with a buffered body ("decode" or "encode"), editable in place
        until they are released; None when none arrived (or nothing is held)."""
        state = self.state
        if state is None:
            return None
        for kind, payload, _ in state.held[direction]:
            if kind == "trailers":
                return payload
        return None

    def request_headers(self) -> HeaderMap | None:
        return self.maps.get("decode")

    def response_headers(self) -> HeaderMap | None:
        return self.maps.get("encode")

    def defer_cleanup(self, owner: HttpFilter, fn: Callable[[], None]) -> None:
        """Call `fn()` when the request ends (timed in `owner`'s stage): end-of-request work for
        a shared filter, which has no on_destroy of its own."""
        if self.done:
            fn()
            return
        self._st().cleanups.append((self.filters.index(owner), fn))

    # ---- the engine ------------------------------------------------------------------

    def _feed(self, direction: str, kind: str, payload, end_stream: bool) -> None:
        state = self.state
        stop = state.stopped[direction] if state is not None else None
        if state is not None and stop is not None:
            stopped_kind, position = stop
            if stopped_kind == "headers" and state.body_for[direction] is not None:
                self._buffer_whole_body(direction, kind, payload, end_stream)
                return
            if stopped_kind == "data" and kind == "data":
                # The stopped filter (STOP_AND_BUFFER) sees each further chunk; it decides when to go on.
                entries = self.factory.hooks[f"{direction}_{kind}"]
                self._run(direction, kind, entries, payload, end_stream, position, hold_first=True)
                return
            state.held[direction].append((kind, payload, end_stream))
            return
        self._run(
            direction, kind, self.factory.hooks[f"{direction}_{kind}"], payload, end_stream, 0
        )

    def _run(
        self,
        direction: str,
        kind: str,
        entries: tuple,
        payload,
        end_stream: bool,
        position: int,
        hold_first: bool = False,
    ) -> bool:
        if self.replied or self.done:
            return False
        filters = self.filters
        ctx = self.exchange.ctx
        timed = ctx.timed
        if timed:
            block = ctx.block
            # One clock read per hook: each hook's time runs from the previous read (the run
            # loop's own steps included, which are the filters' cost too).
            t = perf_counter_ns()
        trailers = kind == "trailers"
        data = kind == "data"
        for entry in entries[position:] if position else entries:
            index, fn, ns_slot, events_slot = entry
            instance = filters[index]
            instance.callbacks = self  # a shared instance learns its request for this call
            status = fn(instance, payload) if trailers else fn(instance, payload, end_stream)
            if data and self.chunk is not None:
                payload, self.chunk = self.chunk, None
            if timed:
                now = perf_counter_ns()
                spent = now - t
                t = now
                block[ns_slot] += spent
                self.hook_ns += spent
                block[events_slot] += 1
            if self.replied:
                return False
            if status != CONTINUE:
                pos = entries.index(entry, position)  # where it stopped (rare: not counted)
                self._stopped(direction, kind, payload, end_stream, pos, index, status, hold_first)
                return False
            if hold_first and data:
                # The buffering filter let go: what it held travels on as one chunk.
                held = self._st().held_body[direction]
                held.append(bytes(payload))
                payload = b"".join(held)
                held.clear()
                hold_first = False
        if self.state is not None:
            self.state.stopped[direction] = None
        if data:  # _emit's, without the call (as the two below)
            if direction == "encode":
                self.exchange.forward_response_body(payload, end_stream)
            else:
                self.exchange.forward_request_body(payload, end_stream)
        elif not trailers:
            if direction == "encode":
                self.exchange.forward_response_head(end_stream)
        else:
            self._emit(direction, kind, payload, end_stream)
        return True

    def _one(
        self, direction: str, kind: str, entry: tuple, payload, end_stream: bool, clocked: bool
    ) -> bool:
        """_run for a chain of one filter with nothing held (headers or data): its one hook
        at position 0, without the loop."""
        if self.replied or self.done:
            return False
        index, fn, ns_slot, events_slot = entry
        instance = self.filters[index]
        instance.callbacks = self
        ctx = self.exchange.ctx
        if not ctx.timed:
            status = fn(instance, payload, end_stream)
        elif clocked:
            t = perf_counter_ns()
            status = fn(instance, payload, end_stream)
            spent = perf_counter_ns() - t
            block = ctx.block
            block[ns_slot] += spent
            block[events_slot] += 1
            self.hook_ns += spent
        else:
            status = fn(instance, payload, end_stream)
            ctx.block[events_slot] += 1
        data = kind == "data"
        if data and self.chunk is not None:
            payload, self.chunk = self.chunk, None
        if self.replied:
            return False
        if status != CONTINUE:
            self._stopped(direction, kind, payload, end_stream, 0, index, status, False)
            return False
        if self.state is not None:
            self.state.stopped[direction] = None
        if data:
            if direction == "encode":
                self.exchange.forward_response_body(payload, end_stream)
            else:
                self.exchange.forward_request_body(payload, end_stream)
        elif direction == "encode":
            self.exchange.forward_response_head(end_stream)
        return True

    def _stopped(
        self, direction: str, kind: str, payload, end_stream: bool, pos: int, index: int,
        status: int, hold_first: bool,
    ) -> None:  # fmt: skip
        state = self._st()
        state.stopped[direction] = (kind, pos)
        if kind == "trailers":
            state.stopped_trailers[direction] = payload
        if kind == "headers" and status == STOP_AND_BUFFER and not end_stream:
            state.body_for[direction] = index
            if direction == "decode":
                self.exchange.downstream.resume_request()  # the body must come in now
        if kind == "data":
            held = state.held_body[direction]
            if status == STOP_AND_BUFFER or hold_first:
                held.append(bytes(payload))
                if sum(map(len, held)) > DEFAULT_BUFFER_LIMIT:
                    over = 413 if direction == "decode" else 500
                    self.local_reply(over, b"buffer limit exceeded\n", [], None, "LR", "")
            if end_stream:
                state.held[direction].append(("end", None, True))

    def _buffer_whole_body(self, direction: str, kind: str, payload, end_stream: bool) -> None:
        """Headers held for a filter that wants the whole body: collect it, then call its data hook once."""
        state = self._st()
        if kind == "data":
            held = state.held_body[direction]
            if payload:
                held.append(bytes(payload))
                if sum(map(len, held)) > DEFAULT_BUFFER_LIMIT:
                    over = 413 if direction == "decode" else 500
                    self.local_reply(over, b"buffer limit exceeded\n", [], None, "LR", "")
                    return
            if end_stream:
                state.held[direction].append(("end", None, True))
        else:
            state.held[direction].append((kind, payload, end_stream))
        if not end_stream or self.done:
            return
        index = state.body_for[direction]
        if index is None:
            return
        instance = self.filters[index]
        instance.callbacks = self
        method = getattr(instance, f"{direction}_data")
        ctx = self.exchange.ctx
        if ctx.timed:
            t0 = perf_counter_ns()
            status = method(b"", True)
            spent = perf_counter_ns() - t0
            ctx.block[self.factory.stage_ns[index]] += spent
            ctx.block[self.factory.stage_events[index]] += 1
            self.hook_ns += spent
        else:
            status = method(b"", True)
        self.chunk = None  # this hook edits the held body itself (set_*_buffer)
        if status == CONTINUE and not self.replied:
            self.resume(direction)

    def _release_body(self, direction: str) -> None:
        # The buffered body goes first in the replay, carrying end_stream if it was complete.
        state = self._st()
        state.body_for[direction] = None
        held = state.held_body[direction]
        body = b"".join(held)
        held.clear()
        pending = state.held[direction]
        if pending and pending[0][0] == "end":
            pending[0] = ("data", body, True)
        elif body:
            pending.insert(0, ("data", body, False))

    def resume(self, direction: str) -> None:
        """A stopped filter continues: finish its event, then replay what was held, in order."""
        state = self.state
        stop = state.stopped[direction] if state is not None else None
        if state is None or stop is None or self.replied or self.done:
            return
        kind, position = stop
        state.stopped[direction] = None
        hooks = self.factory.hooks
        if kind == "headers":
            if state.body_for[direction] is not None:
                self._release_body(direction)
            entries = hooks[f"{direction}_headers"]
            if (
                self._run(direction, "headers", entries, self.maps[direction], False, position + 1)
                and direction == "decode"
            ):
                self.exchange.headers_decoded()
        elif kind == "data":
            held = state.held_body[direction]
            payload = b"".join(held)
            held.clear()
            end = bool(state.held[direction]) and state.held[direction][0][0] == "end"
            if end:
                state.held[direction].pop(0)
            self._run(direction, "data", hooks[f"{direction}_data"], payload, end, position + 1)
        elif kind == "trailers":
            entries = hooks[f"{direction}_trailers"]
            trailers, state.stopped_trailers[direction] = state.stopped_trailers[direction], None
            self._run(direction, "trailers", entries, trailers, True, position + 1)
        pending, state.held[direction] = state.held[direction], []
        for held_kind, payload, end_stream in pending:
            if state.stopped[direction] is not None:
                state.held[direction].append((held_kind, payload, end_stream))
                continue
            if held_kind == "end":
                self._emit(direction, "data", b"", True)
            else:
                entries = hooks[f"{direction}_{held_kind}"]
                self._run(direction, held_kind, entries, payload, end_stream, 0)

    def _emit(self, direction: str, kind: str, payload, end_stream: bool) -> None:
        exchange = self.exchange
        if direction == "decode":
            if kind == "data":
                exchange.forward_request_body(payload, end_stream)
            elif kind == "trailers":
                exchange.forward_request_trailers(payload)
        else:
            if kind == "headers":
                exchange.forward_response_head(end_stream)
            elif kind == "data":
                exchange.forward_response_body(payload, end_stream)
            else:
                exchange.forward_response_trailers(payload)

    def local_reply(
        self,
        status: int,
        body: bytes,
        headers: list,
        grpc_status: int | None,
        flag: str,
        details: str,
    ) -> None:
        if self.replied:
            return
        self.replied = True
        self.exchange.filter_local_reply(status, body, headers, grpc_status, flag, details)

    def destroy(self) -> None:
        if self.done:
            return
        self.done = True
        factory = self.factory
        if factory.one_finisher and self.state is None:
            # run_destroyers' work for its one filter, without the loops (no cleanups asked).
            instance = self.filters[0]
            ctx = self.exchange.ctx
            if ctx.timed:
                t0 = perf_counter_ns()
                instance.on_destroy()
                ctx.block[factory.stage_ns[0]] += perf_counter_ns() - t0
            else:
                instance.on_destroy()
            self.filters = ()
            return
        self.run_destroyers()

    def run_destroyers(self) -> None:
        """Call (and time) the on_destroy hooks and cleanups; the chain is done, resumes are ignored."""
        factory = self.factory
        state = self.state
        if factory.finishers or (state is not None and state.cleanups):
            ctx = self.exchange.ctx
            timed, block = ctx.timed, ctx.block
            filters = self.filters
            for index in factory.finishers:
                if timed:
                    t0 = perf_counter_ns()
                    filters[index].on_destroy()
                    block[factory.stage_ns[index]] += perf_counter_ns() - t0
                else:
                    filters[index].on_destroy()
            if state is not None:
                cleanups, state.cleanups = state.cleanups, []
                for index, fn in cleanups:
                    if timed:
                        t0 = perf_counter_ns()
                        fn()
                        block[factory.stage_ns[index]] += perf_counter_ns() - t0
                    else:
                        fn()
        # Break the filter -> callbacks (this chain) -> filters cycle so refcounting frees the
        # request's objects now, instead of leaving cyclic garbage for the GC every request;
        # shared instances must not keep the last request alive either.
        self.filters = ()
        for instance in factory.shared_instances:
            instance.callbacks = None
