"""In-process cost of the HTTP filter chain per request, for filter_bench's configurations.

`python -m pyproxy.bench.chain_micro` builds, for each configuration of
`filter_bench.py` (the same filter configs, same chain order), the
ChainFactory a worker builds, and drives it through one request's life the
way `pyproxy/http/exchange.py` does with a chain on the route:

    Exchange.start            timer, chain_factory.start, pause_request,
                              request HeaderMap, chain.decode_headers, charge
    Exchange.headers_decoded  chain.maps["decode"].changed (replace() if so)
    Exchange.response_head    encode side entered only if factory.encodes
    Exchange.forward_response_head   the encode map's status and headers
    Exchange.response_end     chain.encode_data(b"", True) if factory.encodes
    Exchange._finish          call_soon(run_destroyers) if any destroyer, else destroy()

Sockets, codec, routing and the upstream pool are left out (they are the same
with and without a chain); the downstream's pause/resume are no-ops here. The
requests run one after another on a uvloop loop, each scheduled by
`call_soon`, so deferred destroyers and the tap sink's flush run between
requests as they do in a worker. The no-filter path (`baseline`) runs the
same driver without a chain.

Reported per configuration, medians over interleaved rounds (configurations
shuffled each round; these are 2-core machines with noisy neighbours):

* added µs/req: wall time per request minus the baseline's in the same round
  (what the chain costs the request, everything included, tap's drain too);
* stage µs/req: the `filter:*` stages recorded by the chain ÷ requests, i.e.
  what the stage clock would show for these filters (tap's drain excluded,
  shown in its own column as in filter_bench);
* outside µs/req: added − stage − drain, the chain cost the stage clock does
  not see.

The stage clock is on (as in filter_bench). `--profile NAME` runs one
configuration under cProfile instead and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter_ns

from pyproxy.bench.filter_bench import CHAIN_ORDER, configurations
from pyproxy.bench.filter_configs import filter_entry
from pyproxy.bench.results_folder import publish

from pyproxy.chain.api import FactoryContext, HeaderMap
from pyproxy.chain.http_chain import FILTER_STAGE_BASE, ChainFactory, HttpChain
from pyproxy.chain.registry import validate
from pyproxy.codec.events import RequestHead, ResponseHead
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.config import FilterSpec
from pyproxy.counters import (
    FILTER_COUNTERS_BASE,
    FILTER_COUNTERS_PER_SLOT,
    LISTENER_SLOTS,
    MAX_FILTERS,
    STAGE_NS,
)
from pyproxy.http.exchange import end_chain, start_chain
from pyproxy.http.heads import filtered_request

# What wrk / the filter_bench client send, and what nginx answers (100-byte body).
REQUEST_HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
RESPONSE_HEADERS = [
    (b"server", b"nginx"),
    (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"100"),
    (b"connection", b"keep-alive"),
]


class _Context:
    """The slice of HttpContext the chain and this driver use."""

    def __init__(self, loop, block: memoryview) -> None:
        self.loop = loop
        self.block = block
        self.timed = True


class _Downstream:
    protocol = "HTTP/1.1"

    def pause_request(self) -> None:
        pass

    def resume_request(self) -> None:
        pass


class _Exchange:
    """Exchange's chain-facing fields and, in `run`, its chain calls for one 200 response, in order."""

    __slots__ = (
        "ctx",
        "downstream",
        "request",
        "chain",
        "finished",
        "status",
        "flag",
        "head_only",
        "response_head_in",
        "sent",
    )

    def __init__(self, ctx: _Context, downstream: _Downstream) -> None:
        self.ctx = ctx
        self.downstream = downstream
        self.request = RequestHead(b"GET", b"/", list(REQUEST_HEADERS))
        self.chain: HttpChain | None = None
        self.finished = False
        self.status = 0
        self.flag = ""
        self.head_only = True
        self.response_head_in: ResponseHead | None = None
        self.sent: tuple[int, list] | None = None

    def run(self, chain_factory: ChainFactory | None, response: ResponseHead) -> None:
        # ---- Exchange.start
        request = self.request
        authority = request.headers[0][1]
        if chain_factory is None:
            self.headers_decoded()
        elif start_chain(
            self, chain_factory, request.method, request.target, request.headers, authority,
            self.head_only,
        ):  # fmt: skip
            self.headers_decoded()
        # ---- Exchange.response_head
        self.status = response.status
        self.response_head_in = response
        chain = self.chain
        if chain is not None and chain.factory.encodes and response.status != 101:
            encode = HeaderMap(
                strip_hop_by_hop(response.headers), {b":status": b"%d" % response.status}
            )
            chain.encode_headers(encode, False)
        else:
            self.forward_response_head(False)
        # ---- Exchange.response_end (a 100-byte body went through response_body first)
        if chain is not None and chain.factory.encodes:
            chain.encode_data(b"x" * 100, False)
            chain.encode_data(b"", True)
        else:
            self.finish()

    def headers_decoded(self) -> None:
        chain = self.chain
        if chain is not None:
            self.request = filtered_request(self.request, chain.maps["decode"])

    def forward_response_head(self, end_stream: bool) -> None:
        """The head the downstream would be sent (kept in `sent`)."""
        head = self.response_head_in
        assert head is not None
        chain = self.chain
        if chain is not None and "encode" in chain.maps:
            headers = chain.maps["encode"]
            status = int(headers.pseudo.get(b":status", b"%d" % head.status))
            self.sent = (status, headers.headers)
        else:
            self.sent = (head.status, strip_hop_by_hop(head.headers))

    # The chain emits through these (what the exchange forwards to the downstream).
    def forward_response_body(self, data, end_stream: bool) -> None:
        if end_stream:
            self.finish()

    # The bench's requests carry no body and its responses no trailers.
    def forward_request_body(self, data, end_stream: bool) -> None:
        raise RuntimeError("a request body reached the bench, which sends none")

    def forward_request_trailers(self, headers) -> None:
        raise RuntimeError("request trailers reached the bench, which sends none")

    def forward_response_trailers(self, headers) -> None:
        raise RuntimeError("response trailers reached the bench, which sends none")

    def filter_local_reply(self, *args) -> None:
        raise RuntimeError(f"a filter answered locally in the bench: {args}")

    def finish(self) -> None:
        # ---- Exchange._finish, the chain part
        self.finished = True
        chain = self.chain
        if chain is not None:
            self.chain = None
            end_chain(self.ctx, chain)


def run_batch(loop, ctx: _Context, factory: ChainFactory | None, count: int) -> int:
    """`count` requests, one per loop iteration; the loop's wall time in ns."""
    response = ResponseHead(200, b"OK", list(RESPONSE_HEADERS), content_length=100)
    downstream = _Downstream()
    left = count
    errors: list[BaseException] = []

    def step() -> None:
        nonlocal left
        try:
            _Exchange(ctx, downstream).run(factory, response)
        except BaseException as exc:  # the loop would only log it: stop and raise it here
            errors.append(exc)
            loop.stop()
            return
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            loop.call_soon(loop.stop)

    loop.call_soon(step)
    t0 = perf_counter_ns()
    loop.run_forever()
    wall = perf_counter_ns() - t0
    if errors:
        raise errors[0]
    return wall


def _filter_ns(block: memoryview) -> int:
    base = STAGE_NS + FILTER_STAGE_BASE
    return sum(block[base : base + MAX_FILTERS])


def _drain_ns(block: memoryview, factory: ChainFactory | None) -> int:
    # Tap's DRAIN_NS counter (index 2 of its slot's counters).
    if factory is None or "tap" not in factory.names:
        return 0
    slot = factory.names.index("tap")
    return block[FILTER_COUNTERS_BASE + slot * FILTER_COUNTERS_PER_SLOT + 2]


def measure(rounds: int, count: int, only: list[str] | None) -> dict:
    import uvloop

    loop = uvloop.new_event_loop()
    names = [n for n in configurations() if n != "baseline_b" and (not only or n in only)]
    if "baseline" not in names:
        names.insert(0, "baseline")
    # Each configuration gets its own block (its own listener, as in filter_bench).
    blocks = {name: _new_block() for name in names}
    with tempfile.TemporaryDirectory(prefix="pyproxy-chain-micro-") as tmp:
        factories = build_factories(loop, blocks, Path(tmp), names)
        walls: dict[str, list[float]] = {name: [] for name in factories}
        stage: dict[str, list[float]] = {name: [] for name in factories}
        drain: dict[str, list[float]] = {name: [] for name in factories}
        for name in names:  # warm-up: JIT-free, but caches, allocator pools, first-call paths
            run_batch(loop, _Context(loop, blocks[name]), factories[name], count // 4 or 1)
        for _ in range(rounds):
            random.shuffle(names)
            for name in names:
                block = blocks[name]
                f0, d0 = _filter_ns(block), _drain_ns(block, factories[name])
                wall = run_batch(loop, _Context(loop, block), factories[name], count)
                walls[name].append(wall / count / 1e3)
                stage[name].append((_filter_ns(block) - f0) / count / 1e3)
                drain[name].append((_drain_ns(block, factories[name]) - d0) / count / 1e3)
        for f in factories.values():
            if f is not None:
                f.close()
    loop.close()
    base = walls["baseline"]
    out: dict = {"baseline_us": statistics.median(base), "configs": {}}
    for name in factories:
        if name == "baseline":
            continue
        added = statistics.median([w - b for w, b in zip(walls[name], base, strict=True)])
        s, d = statistics.median(stage[name]), statistics.median(drain[name])
        out["configs"][name] = {
            "added_us": round(added, 2),
            "stage_us": round(s, 2),
            "drain_us": round(d, 2),
            "outside_us": round(added - s - d, 2),
        }
    singles = [n for n in ("fault", "ratelimit") if n in out["configs"]]
    if singles:
        out["chain_fixed_cost_us"] = round(
            min(out["configs"][n]["added_us"] - out["configs"][n]["stage_us"] for n in singles), 2
        )
    return out


def build_factories(
    loop, blocks: dict[str, memoryview], workdir: Path, names: list[str]
) -> dict[str, ChainFactory | None]:
    """One ChainFactory per named filter_bench configuration (None for the baseline), same configs."""
    out: dict[str, ChainFactory | None] = {}
    configs = configurations()
    for name in names:
        kinds = configs[name]
        entries = [filter_entry(k, workdir, name) for k in CHAIN_ORDER if k in kinds]
        specs = tuple(
            FilterSpec(e["name"], e["type"], validate(e["type"], e["config"], "http"))
            for e in entries
        )
        slots = {spec.name: i for i, spec in enumerate(specs)}
        context = FactoryContext(loop, "main", "http", blocks[name], slots)
        out[name] = ChainFactory(specs, context, slots) if specs else None
    return out


def _new_block() -> memoryview:
    return memoryview(bytearray(8 * LISTENER_SLOTS)).cast("q")


def profile(name: str, count: int) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    block = _new_block()
    with tempfile.TemporaryDirectory(prefix="pyproxy-chain-micro-") as tmp:
        factory = build_factories(loop, {name: block}, Path(tmp), [name])[name]
        ctx = _Context(loop, block)
        run_batch(loop, ctx, factory, count // 10 or 1)
        prof = cProfile.Profile()
        prof.enable()
        run_batch(loop, ctx, factory, count)
        prof.disable()
        if factory is not None:
            factory.close()
    loop.close()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def report(result: dict) -> str:
    lines = [
        f"baseline (driver, no chain): {result['baseline_us']:.2f} µs/req",
        "",
        "| config | added µs/req | stage µs/req | tap drain µs/req | outside the stage µs/req |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["configs"].items():
        lines.append(
            f"| {name} | {row['added_us']:.2f} | {row['stage_us']:.2f} | {row['drain_us']:.2f} "
            f"| {row['outside_us']:.2f} |"
        )
    if "chain_fixed_cost_us" in result:
        lines.append("")
        lines.append(
            "chain fixed cost (min over fault, ratelimit of added − stage): "
            f"{result['chain_fixed_cost_us']:.2f} µs/req"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=3000, help="per config per round")
    parser.add_argument("--only", nargs="*", help="configurations to run (baseline always runs)")
    parser.add_argument("--profile", metavar="NAME", help="cProfile one configuration instead")
    parser.add_argument("--out", help="also write a results folder here")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, args.requests * 10)
        return 0
    gc.collect()
    started = time.monotonic()
    result = measure(args.rounds, args.requests, args.only)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    publish(args.out, result, report(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
