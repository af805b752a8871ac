"""In-process cost of a Proxy-Wasm module per request, and what the proxy_log shim saves.

`python -m pyproxy.bench.wasm_cost` drives modules through one request's hooks the way
the chain calls them (request headers, response headers, one 100-byte response body
chunk, then done/log/delete), in one process, without sockets:

* `sdk`: the AssemblyScript SDK's headers example, built from source by the SDK
  (filters/wasm_examples/assemblyscript/assembly/headers.ts, as filter_bench's `wasm_sdk`);
* `sdk_no_shim`: the same module with every proxy_log entering the host (the shim off): the
  before of the shim, measured beside it;
* `noop`: the hand-written no-op module (filters/wasm_examples/noop.wat).

Rounds interleave the variants in shuffled order (a 2-core machine with noisy neighbours),
medians reported. Per variant: µs per request in all, µs of it inside guest entries, host
calls per request; and the wasm instructions each entry runs, counted once with fuel in a
child process (the proxy's own engine meters no fuel: its guests are bounded by time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from pyproxy.bench.procs import run_tool
from pyproxy.bench.results_folder import publish
from pyproxy.filters import sdk_modules, wasm_runtime
from pyproxy.filters.wasm import WasmFactory

from pyproxy.chain.api import FactoryContext, HeaderMap

EXAMPLES = Path(__file__).resolve().parent.parent / "filters" / "wasm_examples"
RESPONSE_BODY = b"x" * 100


class _Callbacks:
    """The chain's side of the hooks this driver calls (nothing buffers, nothing replies)."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.held_body: dict[str, list[bytes]] = {"decode": [], "encode": []}

    def send_local_reply(self, *args, **kwargs) -> None:
        raise RuntimeError(f"the module answered locally: {args}")

    def replace_data(self, data: bytes) -> None:
        raise RuntimeError("the module rewrote a body")

    def request_headers(self) -> None:
        return None  # the modules measured here have header callbacks: never asked

    def response_headers(self) -> None:
        return None


def _factory(variant: str, loop) -> WasmFactory:
    if variant == "noop":
        config = WasmFactory.validate({"wasm_file": str(EXAMPLES / "noop.wat")})
    else:
        module = sdk_modules.assemblyscript_module("headers")
        config = {"root_id": "add_header", "wasm_file": str(module), "configuration": "bench"}
        config = WasmFactory.validate(config)
        config["log_shim"] = variant == "sdk"
    return WasmFactory(config, FactoryContext(loop, "bench", "http"))


def _request(factory: WasmFactory, callbacks: _Callbacks) -> None:
    instance = factory.create()
    instance.callbacks = callbacks
    request = HeaderMap([(b"host", b"bench")], {b":method": b"GET", b":path": b"/"})
    response = HeaderMap([(b"content-length", b"100")], {b":status": b"200"})
    if hasattr(instance, "decode_headers"):
        instance.decode_headers(request, True)
    if hasattr(instance, "encode_headers"):
        instance.encode_headers(response, False)
    if hasattr(instance, "encode_data"):
        instance.encode_data(RESPONSE_BODY, True)
    instance.on_destroy()


def _round(factory: WasmFactory, callbacks: _Callbacks, requests: int) -> dict[str, float]:
    runtime = factory.runtime
    inside = [0]
    entry = runtime.entry

    def timed(*args):
        started = time.perf_counter_ns()
        try:
            return entry(*args)
        finally:
            inside[0] += time.perf_counter_ns() - started

    started = time.perf_counter_ns()
    for _ in range(requests):
        _request(factory, callbacks)
    total = time.perf_counter_ns() - started
    runtime.entry = timed
    try:
        for _ in range(requests):
            _request(factory, callbacks)
    finally:
        runtime.entry = entry
    return {"us": total / requests / 1000, "inside_us": inside[0] / requests / 1000}


def _instructions(variant: str) -> dict[str, list[int]]:
    """Wasm instructions (fuel) per guest entry of one request, and host calls in each: counted
    by a child process whose engine meters fuel."""
    argv = [sys.executable, "-m", "pyproxy.bench.wasm_cost", "--count-instructions", variant]
    return json.loads(run_tool(argv, timeout=300, check=True).stdout)


def _count_instructions(variant: str) -> dict[str, list[int]]:
    """The child's side of _instructions: this process's engine meters fuel."""
    wasm_runtime.count_instructions()
    loop = asyncio.new_event_loop()
    callbacks = _Callbacks(loop)
    factory = _factory(variant, loop)
    for _ in range(200):  # as measured: after the warm-up (the guest's state grows at first)
        _request(factory, callbacks)
    runtime = factory.runtime
    names = {handle[0]: name for name, handle in runtime.exports.items()}
    names.update({handle[0]: f"joined:{name}" for name, handle in runtime.entering.items()})
    if runtime.ending is not None:
        names[runtime.ending[0]] = "joined:done+log+delete"
    counted: dict[str, list[int]] = {}
    entry = runtime.entry
    store = runtime.store
    assert store is not None

    def counting(func, n, *args):
        before = store.get_fuel()
        result = entry(func, n, *args)
        counted[names.get(func, str(func))] = [before - store.get_fuel(), runtime.host_calls]
        return result

    runtime.entry = counting
    try:
        _request(factory, callbacks)
    finally:
        runtime.entry = entry
        factory.close()
        loop.close()
    return counted


def measure(rounds: int, requests: int, variants: list[str]) -> dict:
    loop = asyncio.new_event_loop()
    callbacks = _Callbacks(loop)
    factories = {v: _factory(v, loop) for v in variants}
    for factory in factories.values():  # warm up: heaps grown, caches hot
        for _ in range(200):
            _request(factory, callbacks)
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for variant in order:
            samples[variant].append(_round(factories[variant], callbacks, requests))
    result: dict = {"rounds": rounds, "requests": requests, "variants": {}}
    for variant, factory in factories.items():
        entries = _instructions(variant)
        result["variants"][variant] = {
            "us_per_request": statistics.median(s["us"] for s in samples[variant]),
            "inside_guest_us": statistics.median(s["inside_us"] for s in samples[variant]),
            "entries": entries,
            "instructions_per_request": sum(used for used, _ in entries.values()),
            "host_calls_per_request": sum(calls for _, calls in entries.values()),
        }
        factory.close()
    loop.close()
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['rounds']} interleaved rounds x {result['requests']} requests per variant, medians",
        "",
        "| variant | µs/request | inside guest entries µs | wasm instructions/request "
        "| host calls/request |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, v in result["variants"].items():
        lines.append(
            f"| {variant} | {v['us_per_request']:.1f} | {v['inside_guest_us']:.1f} "
            f"| {v['instructions_per_request']} | {v['host_calls_per_request']} |"
        )
    lines.append("")
    for variant, v in result["variants"].items():
        detail = ", ".join(f"{name} {used}" for name, (used, _) in v["entries"].items())
        lines.append(f"{variant}: instructions per entry: {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--requests", type=int, default=2000, help="per variant per round")
    parser.add_argument(
        "--variants", nargs="*", default=["sdk", "sdk_no_shim", "noop"], help="what to run"
    )
    parser.add_argument("--out", help="also write a results folder here")
    parser.add_argument("--count-instructions", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_instructions:
        print(json.dumps(_count_instructions(args.count_instructions)))
        return 0
    started = time.monotonic()
    result = measure(args.rounds, args.requests, args.variants)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    publish(args.out, result, report(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
