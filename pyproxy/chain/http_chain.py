"""Runs an HTTP filter chain for one request: hooks in order, stop/resume, bounded buffering, timing.

The exchange hands request events to `decode_*` and response events to
`encode_*`; each returns whatever must travel on (or nothing while a filter
holds the direction). A stopped filter resumes its direction with
`callbacks.continue_decoding()` / `continue_encoding()`; the chain then
replays what it held, in order, from the next filter on.
"""

from __future__ import annotations

from time import perf_counter_ns

from pyproxy.chain.api import CONTINUE, STOP_AND_BUFFER, FactoryContext, HeaderMap, HttpFilter
from pyproxy.chain.registry import factory_class
from pyproxy.config import FilterSpec
from pyproxy.counters import STAGE_EVENTS, STAGE_NS, STAGES

FILTER_STAGE_BASE = len(STAGES)
DEFAULT_BUFFER_LIMIT = (
    1024 * 1024
)  # STOP_AND_BUFFER beyond this answers 413 (request) or 500 (response)


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

        def implementing(hook: str, reverse: bool = False) -> tuple[int, ...]:
            order = range(len(classes) - 1, -1, -1) if reverse else range(len(classes))
            return tuple(i for i in order if getattr(classes[i], hook, None) is not None)

        # Encoders run in reverse chain order (Envoy's rule: the first filter sees the response last).
        self.hooks = {
            "decode_headers": implementing("decode_headers"),
            "decode_data": implementing("decode_data"),
            "decode_trailers": implementing("decode_trailers"),
            "encode_headers": implementing("encode_headers", True),
            "encode_data": implementing("encode_data", True),
            "encode_trailers": implementing("encode_trailers", True),
        }
        # on_destroy is a hook too (WASM/Lua contexts end there): called and timed only where overridden.
        self.destroyers = tuple(
            i
            for i, cls in enumerate(classes)
            if getattr(cls, "on_destroy", None) is not HttpFilter.on_destroy
        )
        self.decodes_body = bool(self.hooks["decode_data"] or self.hooks["decode_trailers"])
        self.encodes = any(
            self.hooks[h] for h in ("encode_headers", "encode_data", "encode_trailers")
        )

    def start(self, exchange) -> HttpChain:
        return HttpChain(self, exchange)

    def charge(self, block, overhead_ns: int) -> None:
        """Share the chain's own per-request work (set-up, run loop) among its filters' stages."""
        if overhead_ns <= 0:
            return
        share = overhead_ns // len(self.stage_ns)
        for slot in self.stage_ns:
            block[slot] += share

    def close(self) -> None:
        for factory in self.factories:
            factory.close()


class _Callbacks:
    """What one filter instance may call back into; one per filter per request."""

    __slots__ = ("chain", "index")

    def __init__(self, chain: HttpChain, index: int) -> None:
        self.chain, self.index = chain, index

    @property
    def loop(self):
        return self.chain.exchange.ctx.loop

    @property
    def exchange(self):
        return self.chain.exchange

    def continue_decoding(self) -> None:
        self.chain.resume("decode", self.index)

    def continue_encoding(self) -> None:
        self.chain.resume("encode", self.index)

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        headers=(),
        grpc_status: int | None = None,
        flag: str = "LR",
        details: str = "",
    ) -> None:
        self.chain.local_reply(status, body, list(headers), grpc_status, flag, details)

    def decoding_buffer(self) -> bytes:
        return b"".join(self.chain.held_body["decode"])

    def encoding_buffer(self) -> bytes:
        return b"".join(self.chain.held_body["encode"])

    def set_decoding_buffer(self, data: bytes) -> None:
        """Replace the buffered request body (the filter updates content-length itself)."""
        self.chain.held_body["decode"][:] = [bytes(data)]

    def set_encoding_buffer(self, data: bytes) -> None:
        self.chain.held_body["encode"][:] = [bytes(data)]

    def request_headers(self) -> HeaderMap | None:
        return self.chain.maps.get("decode")

    def response_headers(self) -> HeaderMap | None:
        return self.chain.maps.get("encode")


class _ChainState:
    """Where a direction stopped and what it holds: only built once some filter stops (rare)."""

    __slots__ = ("stopped", "held", "held_body", "body_for")

    def __init__(self) -> None:
        # Per direction: position in the hook list where a filter stopped, and the events held since.
        self.stopped: dict[str, tuple[str, int] | None] = {"decode": None, "encode": None}
        self.held: dict[str, list] = {"decode": [], "encode": []}
        self.held_body: dict[str, list[bytes]] = {"decode": [], "encode": []}
        # Per direction: the filter that stopped the headers with STOP_AND_BUFFER and wants the
        # whole body (its data hook is called once, at the end) before the headers move on.
        self.body_for: dict[str, int | None] = {"decode": None, "encode": None}


class HttpChain:
    """One request's pass through the chain, in both directions."""

    __slots__ = (
        "factory",
        "exchange",
        "filters",
        "timed",
        "block",
        "maps",
        "state",
        "done",
        "replied",
        "hook_ns",
    )

    def __init__(self, factory: ChainFactory, exchange) -> None:
        self.factory = factory
        self.exchange = exchange
        self.filters = filters = [f.create() for f in factory.factories]
        for index, instance in enumerate(filters):
            instance.callbacks = _Callbacks(self, index)
        ctx = exchange.ctx
        self.timed = ctx.timed
        self.block = ctx.block
        self.maps: dict[str, HeaderMap] = {}
        self.state: _ChainState | None = None  # built on the first stop (see _ChainState)
        self.done = False
        self.replied = False
        self.hook_ns = (
            0  # time inside filter hooks (timed): the rest of the chain's time is its own
        )

    def _st(self) -> _ChainState:
        state = self.state
        if state is None:
            state = self.state = _ChainState()
        return state

    @property
    def held_body(self) -> dict[str, list[bytes]]:
        return self._st().held_body

    # ---- entry points (from the exchange) ---------------------------------------------

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> bool:
        """True when every filter let the headers through (the exchange may go upstream now)."""
        self.maps["decode"] = headers
        return self._run("decode", "headers", headers, end_stream, 0, hook="decode_headers")

    def decode_data(self, data, end_stream: bool) -> None:
        self._feed("decode", "data", data, end_stream)

    def decode_trailers(self, trailers) -> None:
        self._feed("decode", "trailers", trailers, True)

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> bool:
        self.maps["encode"] = headers
        return self._run("encode", "headers", headers, end_stream, 0, hook="encode_headers")

    def encode_data(self, data, end_stream: bool) -> None:
        self._feed("encode", "data", data, end_stream)

    def encode_trailers(self, trailers) -> None:
        self._feed("encode", "trailers", trailers, True)

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
                self._run(direction, kind, payload, end_stream, position, hold_first=True)
                return
            state.held[direction].append((kind, payload, end_stream))
            return
        self._run(direction, kind, payload, end_stream, 0)

    def _run(
        self,
        direction: str,
        kind: str,
        payload,
        end_stream: bool,
        position: int,
        hold_first: bool = False,
        hook: str = "",
    ) -> bool:
        if self.replied or self.done:
            return False
        hook = hook or f"{direction}_{kind}"
        order = self.factory.hooks[hook]
        filters = self.filters
        block = self.block
        timed = self.timed
        for pos in range(position, len(order)):
            index = order[pos]
            method = getattr(filters[index], hook)
            if timed:
                t0 = perf_counter_ns()
                status = method(payload, end_stream) if kind != "trailers" else method(payload)
                spent = perf_counter_ns() - t0
                block[self.factory.stage_ns[index]] += spent
                block[self.factory.stage_events[index]] += 1
                self.hook_ns += spent
            else:
                status = method(payload, end_stream) if kind != "trailers" else method(payload)
            if self.replied:
                return False
            if status != CONTINUE:
                state = self._st()
                state.stopped[direction] = (kind, pos)
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
                return False
            if kind == "data" and hold_first:
                # The buffering filter let go: what it held travels on as one chunk.
                held = self._st().held_body[direction]
                held.append(bytes(payload))
                payload = b"".join(held)
                held.clear()
                hold_first = False
        if self.state is not None:
            self.state.stopped[direction] = None
        self._emit(direction, kind, payload, end_stream)
        return True

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
        method = getattr(self.filters[index], f"{direction}_data")
        if self.timed:
            t0 = perf_counter_ns()
            status = method(b"", True)
            spent = perf_counter_ns() - t0
            self.block[self.factory.stage_ns[index]] += spent
            self.block[self.factory.stage_events[index]] += 1
            self.hook_ns += spent
        else:
            status = method(b"", True)
        if status == CONTINUE and not self.replied:
            self.resume(direction, index)

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

    def resume(self, direction: str, index: int) -> None:
        """A stopped filter continues: finish its event, then replay what was held, in order."""
        state = self.state
        stop = state.stopped[direction] if state is not None else None
        if state is None or stop is None or self.replied or self.done:
            return
        kind, position = stop
        state.stopped[direction] = None
        if kind == "headers":
            if state.body_for[direction] is not None:
                self._release_body(direction)
            if (
                self._run(direction, "headers", self.maps[direction], False, position + 1)
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
            self._run(direction, "data", payload, end, position + 1)
        elif kind == "trailers":
            self._run(direction, "trailers", None, True, position + 1)
        pending, state.held[direction] = state.held[direction], []
        for held_kind, payload, end_stream in pending:
            if state.stopped[direction] is not None:
                state.held[direction].append((held_kind, payload, end_stream))
                continue
            if held_kind == "end":
                self._emit(direction, "data", b"", True)
            else:
                self._run(direction, held_kind, payload, end_stream, 0)

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
        self.run_destroyers()

    def run_destroyers(self) -> None:
        """Call (and time) the on_destroy hooks; the chain is done, resumes are ignored."""
        factory = self.factory
        filters = self.filters
        block = self.block
        for index in factory.destroyers:
            if self.timed:
                t0 = perf_counter_ns()
                filters[index].on_destroy()
                block[factory.stage_ns[index]] += perf_counter_ns() - t0
            else:
                filters[index].on_destroy()
        # Break the filter -> callbacks -> chain -> filters cycle so refcounting frees the
        # request's objects now, instead of leaving cyclic garbage for the GC every request.
        self.filters = []
