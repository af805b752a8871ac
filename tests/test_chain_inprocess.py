"""The HTTP filter chain driven in-process: hook order, stop and resume, buffering, local replies,
shared filters, end-of-request work and stage accounting — no proxy, no sockets.

The chain talks to its request through a handful of calls (forward_*, headers_decoded,
filter_local_reply, downstream.resume_request); a recording owner stands in for the Exchange
and keeps every call in order, so each test states exactly what the chain let through.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from pyproxy.chain import registry
from pyproxy.chain.api import (
    CONTINUE,
    STOP,
    STOP_AND_BUFFER,
    FactoryContext,
    FilterFactory,
    HeaderMap,
    HttpFilter,
)
from pyproxy.chain.http_chain import DEFAULT_BUFFER_LIMIT, ChainFactory
from pyproxy.config import FilterSpec
from pyproxy.counters import FILTER_STAGE_BASE, LISTENER_SLOTS, STAGE_EVENTS, STAGE_NS

CALLS: list[tuple] = []  # what the test filters saw, in order, across the chain


class Recorder(HttpFilter):
    """Records each hook as (its name, hook, payload) and answers with what `plan` says."""

    name = ""
    plan: dict[str, int] = {}

    def decode_headers(self, headers, end_stream):
        return self._seen("decode_headers", headers.get(b":path"), end_stream)

    def decode_data(self, data, end_stream):
        return self._seen("decode_data", bytes(data), end_stream)

    def encode_headers(self, headers, end_stream):
        return self._seen("encode_headers", headers.get(b":status"), end_stream)

    def encode_data(self, data, end_stream):
        return self._seen("encode_data", bytes(data), end_stream)

    def on_destroy(self) -> None:
        CALLS.append((self.name, "on_destroy"))

    def _seen(self, hook: str, payload, end_stream: bool) -> int:
        CALLS.append((self.name, hook, payload, end_stream))
        return self.plan.get(hook, CONTINUE)


def recorder(name: str, **plan: int) -> type[FilterFactory]:
    """A factory type whose filters record under `name` and return `plan[hook]` (else CONTINUE)."""
    filter_class = type(f"Recorder_{name}", (Recorder,), {"name": name, "plan": plan})
    return type(f"Factory_{name}", (FilterFactory,), {"name": name, "filter_class": filter_class})


class Replier(HttpFilter):
    shared = True  # no per-request state: one instance serves every request

    def decode_headers(self, headers, end_stream):
        CALLS.append(("replier", "decode_headers"))
        self.callbacks.send_local_reply(403, b"denied\n", [(b"x-why", b"test")], flag="UAEX")
        return STOP


class ReplierFactory(FilterFactory):
    filter_class = Replier


class Rewriter(HttpFilter):
    """Hands on other bytes than each response chunk it is given (replace_data)."""

    def encode_data(self, data, end_stream):
        self.callbacks.replace_data(bytes(data).upper())
        return CONTINUE


class RewriterFactory(FilterFactory):
    filter_class = Rewriter


class SharedWithDestroy(HttpFilter):
    shared = True

    def on_destroy(self) -> None:
        pass


class SharedWithDestroyFactory(FilterFactory):
    filter_class = SharedWithDestroy


FACTORIES = {
    "first": recorder("first"),
    "second": recorder("second"),
    "holds_head": recorder("holds_head", decode_headers=STOP),
    "buffers_body": recorder("buffers_body", decode_headers=STOP_AND_BUFFER),
    "holds_response": recorder("holds_response", encode_headers=STOP),
    "replier": ReplierFactory,
    "rewriter": RewriterFactory,
    "shared_destroy": SharedWithDestroyFactory,
}


@pytest.fixture(autouse=True)
def test_filters(monkeypatch):
    """The test factories, found through the entry-point registry like any installed filter."""
    points = {name: EntryPoint(name, f"{__name__}:FACTORIES", registry.GROUP) for name in FACTORIES}
    monkeypatch.setattr(registry, "available", lambda: points)
    monkeypatch.setattr(EntryPoint, "load", lambda self: FACTORIES[self.name])
    CALLS.clear()


class Downstream:
    def __init__(self) -> None:
        self.resumed = 0

    def resume_request(self) -> None:
        self.resumed += 1


class Context:
    def __init__(self, timed: bool) -> None:
        self.loop = None
        self.timed = timed
        self.block = [0] * LISTENER_SLOTS


class Owner:
    """Stands in for the Exchange: records what the chain hands on, in order."""

    def __init__(self, timed: bool = False) -> None:
        self.ctx = Context(timed)
        self.downstream = Downstream()
        self.out: list[tuple] = []

    def headers_decoded(self) -> None:
        self.out.append(("headers_decoded",))

    def forward_request_body(self, data, end_stream: bool) -> None:
        self.out.append(("request_body", bytes(data), end_stream))

    def forward_request_trailers(self, headers) -> None:
        self.out.append(("request_trailers", headers))

    def forward_response_head(self, end_stream: bool) -> None:
        self.out.append(("response_head", end_stream))

    def forward_response_body(self, data, end_stream: bool) -> None:
        self.out.append(("response_body", bytes(data), end_stream))

    def forward_response_trailers(self, headers) -> None:
        self.out.append(("response_trailers", headers))

    def filter_local_reply(self, status, body, headers, grpc_status, flag, details) -> None:
        self.out.append(("local_reply", status, body, headers, flag))


def chain_of(*names: str, timed: bool = False):
    specs = tuple(FilterSpec(name, name) for name in names)
    owner = Owner(timed)
    context = FactoryContext(None, "main", "http")
    factory = ChainFactory(specs, context, {name: i for i, name in enumerate(names)})
    return factory, factory.start(owner), owner


def request_headers(path: bytes = b"/p") -> HeaderMap:
    return HeaderMap([(b"host", b"x")], {b":method": b"POST", b":path": path})


def response_headers(status: bytes = b"200") -> HeaderMap:
    return HeaderMap([(b"content-type", b"text/plain")], {b":status": status})


def test_decoders_run_in_chain_order_and_encoders_in_reverse():
    _, chain, owner = chain_of("first", "second")
    assert chain.decode_headers(request_headers(), False)
    chain.decode_data(b"body", True)
    chain.encode_headers(response_headers(), False)
    chain.encode_data(b"answer", True)
    assert CALLS == [
        ("first", "decode_headers", b"/p", False),
        ("second", "decode_headers", b"/p", False),
        ("first", "decode_data", b"body", True),
        ("second", "decode_data", b"body", True),
        ("second", "encode_headers", b"200", False),
        ("first", "encode_headers", b"200", False),
        ("second", "encode_data", b"answer", True),
        ("first", "encode_data", b"answer", True),
    ]
    # decode_headers' True tells the exchange to go on; the chain itself emits the rest.
    assert owner.out == [
        ("request_body", b"body", True),
        ("response_head", False),
        ("response_body", b"answer", True),
    ]


def test_a_stopped_head_holds_what_follows_and_resume_replays_it_in_order():
    _, chain, owner = chain_of("holds_head", "second")
    assert not chain.decode_headers(request_headers(), False)
    chain.decode_data(b"one", False)
    chain.decode_data(b"two", True)
    assert owner.out == [] and [c[0] for c in CALLS] == ["holds_head"]
    chain.continue_decoding()
    assert owner.out == [
        ("headers_decoded",),
        ("request_body", b"one", False),
        ("request_body", b"two", True),
    ]
    # The filter that stopped is not called again for the head; the next one is, once.
    assert [(c[0], c[1]) for c in CALLS] == [
        ("holds_head", "decode_headers"),
        ("second", "decode_headers"),
        ("holds_head", "decode_data"),
        ("second", "decode_data"),
        ("holds_head", "decode_data"),
        ("second", "decode_data"),
    ]
    chain.continue_decoding()  # resuming what is not stopped does nothing
    assert len(owner.out) == 3


def test_stop_and_buffer_collects_the_whole_body_and_calls_the_filter_once():
    _, chain, owner = chain_of("buffers_body", "second")
    assert not chain.decode_headers(request_headers(), False)
    assert owner.downstream.resumed == 1  # the body must come in while the head waits
    chain.decode_data(b"ab", False)
    chain.decode_data(b"cd", False)
    chain.decode_data(b"", True)
    assert ("buffers_body", "decode_data", b"", True) in CALLS
    assert owner.out == [("headers_decoded",), ("request_body", b"abcd", True)]
    assert ("second", "decode_data", b"abcd", True) in CALLS


def test_a_buffered_body_over_the_limit_is_answered_413_once():
    _, chain, owner = chain_of("buffers_body")
    chain.decode_headers(request_headers(), False)
    chunk = b"x" * (DEFAULT_BUFFER_LIMIT // 2 + 1)
    chain.decode_data(chunk, False)
    chain.decode_data(chunk, False)
    chain.decode_data(chunk, True)
    assert owner.out == [("local_reply", 413, b"buffer limit exceeded\n", [], "LR")]


def test_a_local_reply_stops_the_chain_and_reaches_the_exchange_once():
    _, chain, owner = chain_of("first", "replier", "second")
    assert not chain.decode_headers(request_headers(), True)
    assert owner.out == [("local_reply", 403, b"denied\n", [(b"x-why", b"test")], "UAEX")]
    chain.decode_data(b"late", True)  # nothing runs after the reply
    chain.continue_decoding()
    assert CALLS == [("first", "decode_headers", b"/p", True), ("replier", "decode_headers")]
    assert len(owner.out) == 1


def test_a_held_response_head_is_released_by_continue_encoding():
    _, chain, owner = chain_of("first", "holds_response")
    chain.decode_headers(request_headers(), True)
    assert not chain.encode_headers(response_headers(b"503"), False)
    chain.encode_data(b"late", True)
    assert owner.out == []
    chain.continue_encoding()
    assert owner.out == [("response_head", False), ("response_body", b"late", True)]
    assert ("first", "encode_headers", b"503", False) in CALLS


def test_shared_filters_are_one_instance_and_forget_their_request():
    factory, first, _ = chain_of("replier")
    second = factory.start(Owner())
    assert first.filters[0] is second.filters[0]
    first.decode_headers(request_headers(), True)
    first.destroy()
    assert first.filters == () and factory.shared_instances[0].callbacks is None
    with pytest.raises(TypeError, match="cannot define on_destroy"):
        chain_of("shared_destroy")


def test_end_of_request_work_runs_once_and_cleanups_follow_it():
    _, chain, _ = chain_of("first", "second")
    ran: list[str] = []
    chain.decode_headers(request_headers(), True)
    chain.defer_cleanup(chain.filters[1], lambda: ran.append("cleanup"))
    chain.destroy()
    chain.destroy()
    assert [c for c in CALLS if c[1] == "on_destroy"] == [
        ("first", "on_destroy"),
        ("second", "on_destroy"),
    ]
    assert ran == ["cleanup"]
    chain.defer_cleanup(Recorder(), lambda: ran.append("after"))  # done: runs at once
    assert ran == ["cleanup", "after"]


def test_each_hook_is_charged_to_its_filters_stage():
    _, chain, owner = chain_of("first", "second", timed=True)
    block = owner.ctx.block
    chain.decode_headers(request_headers(), False)
    chain.decode_data(b"b", True)
    chain.encode_headers(response_headers(), True)
    for slot in (FILTER_STAGE_BASE, FILTER_STAGE_BASE + 1):
        assert block[STAGE_EVENTS + slot] == 3
        assert block[STAGE_NS + slot] > 0
    assert chain.hook_ns == sum(block[STAGE_NS + FILTER_STAGE_BASE + i] for i in (0, 1))


@pytest.mark.parametrize("names", [("holds_head",), ("first", "holds_head")])
def test_a_chain_of_one_filter_holds_and_resumes_as_a_longer_one(names):
    factory, chain, owner = chain_of(*names)
    assert factory.single == (len(names) == 1)
    assert not chain.decode_headers(request_headers(), False)
    chain.decode_data(b"one", False)
    chain.decode_data(b"two", True)
    assert owner.out == []
    chain.continue_decoding()
    assert owner.out == [
        ("headers_decoded",),
        ("request_body", b"one", False),
        ("request_body", b"two", True),
    ]
    assert [c[1:] for c in CALLS if c[0] == "holds_head"] == [
        ("decode_headers", b"/p", False),
        ("decode_data", b"one", False),
        ("decode_data", b"two", True),
    ]


@pytest.mark.parametrize("names", [("rewriter",), ("first", "rewriter")])
def test_a_chain_of_one_filter_hands_on_what_a_data_hook_replaced(names):
    _, chain, owner = chain_of(*names)
    assert chain.decode_headers(request_headers(), True)
    assert chain.encode_headers(response_headers(), False)
    chain.encode_data(b"answer", False)
    chain.encode_data(b"end", True)
    assert owner.out == [
        ("response_head", False),
        ("response_body", b"ANSWER", False),
        ("response_body", b"END", True),
    ]
    assert chain.chunk is None


def test_a_chain_of_one_filter_charges_its_hooks_to_its_stage():
    factory, chain, owner = chain_of("first", timed=True)
    assert factory.single
    block = owner.ctx.block
    chain.decode_headers(request_headers(), False)  # the exchange's clock times this pass
    assert block[STAGE_EVENTS + FILTER_STAGE_BASE] == 1
    assert block[STAGE_NS + FILTER_STAGE_BASE] == 0 and chain.hook_ns == 0
    chain.decode_data(b"b", True)
    chain.encode_headers(response_headers(), True)
    assert block[STAGE_EVENTS + FILTER_STAGE_BASE] == 3
    assert block[STAGE_NS + FILTER_STAGE_BASE] == chain.hook_ns > 0
