"""Interleaved rounds over a set of paths, and the paired statistics that survive a noisy host.

The host's slow spells last seconds and hit every path alike (the direct path
too), so a difference or ratio taken within one round, then the median over
rounds, is what survives them; the pooled figure is kept beside it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pyproxy.bench.echo_client import summarize
from pyproxy.bench.http_load import (
    LOAD_CPU,
    SIDE_CPU,
    Path_,
    log,
    measure_http,
    run_wrk,
)
from pyproxy.bench.procs import Noise, cpu_ns, move_to_cpu, on_cpus


def paired_median(values: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of (value - base) within the same round."""
    return statistics.median(a - b for a, b in zip(values, base, strict=True))


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float | None:
    """Median over rounds of value / base within the same round (None if a base is not > 0)."""
    if not values or any(b <= 0 for b in base):
        return None
    return statistics.median(a / b for a, b in zip(values, base, strict=True))


def interleaved(paths: list[Path_], rounds: int, seed: int, phase: str) -> Iterator[Path_]:
    """Every path once per round, in a new shuffled order each round (progress on stderr)."""
    order = list(paths)
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        yield from order
        log(f"  {phase} round {r + 1}/{rounds} done")


def latency_phase(
    paths: list[Path_], rounds: int, count: int, seconds: float, base: str, seed: int = 3
) -> dict:
    """GET round trips at one request outstanding, the paths in shuffled order each round.

    Per path: the pooled summary, each round's p50, and added p50 over `base`
    (paired = median over rounds; pooled = all samples' p50 − base's).
    """
    samples: dict[str, list[int]] = {p.name: [] for p in paths}
    per_round: dict[str, list[float]] = {p.name: [] for p in paths}
    for p in interleaved(paths, rounds, seed, "latency"):
        rtts = measure_http(p.port, count, 100, p.absolute, max_seconds=seconds)
        samples[p.name] += rtts
        per_round[p.name].append(summarize(rtts)["p50_us"])
    out = {name: summarize(values) for name, values in samples.items()}
    reference = out[base]
    for name, values in out.items():
        values["p50_us_rounds"] = per_round[name]
        values["added_p50_us"] = paired_median(per_round[name], per_round[base])
        values["added_p50_us_pooled"] = values["p50_us"] - reference["p50_us"]
        values["added_p99_us"] = values["p99_us"] - reference["p99_us"]
    return out


def load_phase(
    paths: list[Path_], workdir: Path, rounds: int, seconds: int, connections: int, base: str,
    seed: int = 8,
) -> dict:  # fmt: skip
    """`wrk -t1 -c<connections>` per path per round, the proxy alone on LOAD_CPU.

    Per path: CPU µs per request (pooled, per round, their median, and added
    over `base` paired and pooled), req/s per round and their median.
    """
    runs: dict[str, list[dict]] = {p.name: [] for p in paths}
    for p in interleaved(paths, rounds, seed, "load"):
        pids = p.pids()
        move_to_cpu(pids, LOAD_CPU)
        before = cpu_ns(pids)
        wall0 = time.perf_counter()
        out = run_wrk(p, workdir, seconds, connections)
        wall = time.perf_counter() - wall0
        out["cpu_ns"] = cpu_ns(pids) - before
        out["cpu_util"] = out["cpu_ns"] / 1e9 / wall
        move_to_cpu(pids, SIDE_CPU)
        runs[p.name].append(out)
        for sink in workdir.glob(f"tap-{p.name}.jsonl"):  # keep a tap filter's sink small
            os.truncate(sink, 0)
    out = {}
    for name, values in runs.items():
        requests = sum(v["requests"] for v in values)
        per_round = [v["cpu_ns"] / v["requests"] / 1e3 for v in values]
        out[name] = {
            "requests": requests,
            "rps_rounds": [v["rps"] for v in values],
            "rps_median": statistics.median(v["rps"] for v in values),
            "cpu_us_per_req": sum(v["cpu_ns"] for v in values) / requests / 1e3,
            "cpu_us_per_req_rounds": per_round,
            "cpu_us_per_req_median": statistics.median(per_round),
            "cpu_util_rounds": [v["cpu_util"] for v in values],
            "errors": sum(v["non_2xx"] + v["socket_errors"] for v in values),
        }
    reference = out[base]
    for values in out.values():
        values["added_cpu_us_per_req_pooled"] = (
            values["cpu_us_per_req"] - reference["cpu_us_per_req"]
        )
        values["added_cpu_us_per_req"] = paired_median(
            values["cpu_us_per_req_rounds"], reference["cpu_us_per_req_rounds"]
        )
    return out


def run_phases(
    result: dict, args: argparse.Namespace, workdir: Path, paths: list[Path_], *,
    latency_base: str, load_paths: list[Path_], connections: int, load_base: str,
    snapshot: Callable[[str], None],
) -> None:  # fmt: skip
    """The latency phase (this process on SIDE_CPU with the rest), then the load phase, into
    `result`; each with the CPU the rest of the machine took meanwhile, `snapshot(phase)` after."""
    log(f"latency: {len(paths)} paths x {args.rounds} rounds x {args.requests} requests")
    with on_cpus(SIDE_CPU):
        noise = Noise()
        result["latency"] = latency_phase(
            paths, args.rounds, args.requests, args.round_seconds, base=latency_base
        )
        result["foreign_cpus"] = {"latency": noise.cpus()}
    snapshot("latency")
    log(f"load: wrk -t1 -c{connections} -d{args.seconds}s x {args.load_rounds} rounds per path")
    noise = Noise()
    result["load"] = load_phase(
        load_paths, workdir, args.load_rounds, args.seconds, connections, base=load_base
    )
    result["foreign_cpus"]["load"] = noise.cpus()
    snapshot("load")
