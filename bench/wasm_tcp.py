"""What a Proxy-Wasm filter on a TCP listener adds to a 100-byte echo, in one run.

Paths, all on CPU 0 with the echo upstream and the client (no configuration wins by spreading
work): `direct` (the upstream itself), `none` (a tcp listener without filters: the plain copy
relay), `wasm_pass` (a hand-written module whose downstream and upstream data callbacks return
Continue: the editing relay and one guest entry per read) and `wasm_sdk` (the AssemblyScript
SDK's `tcp.ts`, built from source: it reads, upper-cases and rewrites every downstream read
and counts the upstream's). Rounds visit the paths in a new shuffled order each time; per
path and round the p50 of `--messages` round trips at one outstanding message; added p50 is
the median over rounds of (path p50 - direct p50) within the round.

Bounded: about a minute with the defaults; progress on stderr; JSON in bench/results/wasm_tcp/;
the markdown table on stdout. Every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.echo_client import measure_rtts
from pyproxy.bench.procs import Processes, on_cpus
from pyproxy.bench.results_folder import default_out, publish
from pyproxy.filters import sdk_modules

PASS_THROUGH = """(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
 (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
 (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) (i32.const 0))
 (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) (i32.const 0)))"""


def listeners(upstream: str) -> dict[str, dict]:
    sdk = str(sdk_modules.assemblyscript_module("tcp"))
    sdk_config = {
        "root_id": "tcp",
        "configuration": "enabled",  # this SDK version needs one (README, wasm)
        "vm_config": {"code": {"local": {"filename": sdk}}},
    }
    return {
        "none": {"mode": "tcp", "upstream": upstream},
        "wasm_pass": {
            "mode": "tcp",
            "upstream": upstream,
            "filters": [{"name": "w", "type": "wasm", "config": {"code_wat": PASS_THROUGH}}],
        },
        "wasm_sdk": {
            "mode": "tcp",
            "upstream": upstream,
            "filters": [{"name": "w", "type": "wasm", "config": sdk_config}],
        },
    }


def measure(rounds: int, messages: int) -> dict:
    procs = Processes()
    with on_cpus(0), tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
        try:
            echo = peers.echo_server(procs, 0).ready()
            configs = listeners(echo.address)
            started = {
                name: peers.pyproxy_config(procs, Path(tmp), name, config, 0).ready()
                for name, config in configs.items()
            }
            paths = {"direct": echo.address, **{n: s.address for n, s in started.items()}}
            for address in paths.values():
                measure_rtts(address, 500)  # warm every path up before any round counts
            p50: dict[str, list[float]] = {name: [] for name in paths}
            for r in range(rounds):
                order = list(paths)
                random.shuffle(order)
                for name in order:
                    p50[name].append(statistics.median(measure_rtts(paths[name], messages)) / 1e3)
                print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
        finally:
            procs.stop_all()
    return {
        name: {
            "p50_us_rounds": [round(v, 2) for v in values],
            "added_p50_us": round(
                statistics.median(v - d for v, d in zip(values, p50["direct"], strict=True)), 2
            ),
        }
        for name, values in p50.items()
    }


def report(result: dict) -> str:
    lines = [
        "| 100 B echo, TCP listener | added p50 µs (median of rounds) | vs none µs | p50 µs per round |",
        "| --- | ---: | ---: | --- |",
    ]
    none = result["none"]["added_p50_us"]
    for name, v in result.items():
        extra = "—" if name in ("direct", "none") else f"{v['added_p50_us'] - none:+.2f}"
        rounds = " ".join(f"{x:.1f}" for x in v["p50_us_rounds"])
        lines.append(f"| {name} | {v['added_p50_us']:.2f} | {extra} | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--messages", type=int, default=3000, help="per path per round")
    parser.add_argument("--out", default=str(default_out("wasm_tcp")), help="results folder")
    args = parser.parse_args(argv)
    print(f"wasm on a TCP listener: 4 paths x {args.rounds} rounds", file=sys.stderr)
    result = measure(args.rounds, args.messages)
    publish(args.out, result, report(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
