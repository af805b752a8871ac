"""What a sidecar pass costs after its process waited, whether its CPU idled or ran other sidecars.

`predict` prices a sidecar's wake-up, on shared CPUs, by the gap its own process had since it
last ran, not by how long its CPU idled (`schedule`). This bench is the measurement behind that
rule. K sidecars of one setup, each with its echo (100 µs of work), run alone on CPU 1; the
driver and the echoes on CPU 0. Each sidecar's gap between its passes is made K round trips
long in two ways:

* **rotation**: the driver calls the K sidecars in turn, back to back. CPU 1 never idles, yet
  each sidecar waits while the K − 1 others pass their calls.
* **paced**: one sidecar, called once every K round trips (K times the same round's rotation
  of one). Its CPU idles as long as it waits.

Per call: the sidecar's stage clock (`/stats`) and its CPU (`/proc`), medians over rounds. If a
pass costs about the same after the same gap filled either way, the wait is what costs (its
code and data gone cold), and a schedule prices a pass by its own sidecar's gap; if rotation
cost nothing, the CPU's idling would be what costs.

    flock /tmp/pyproxy-bench.lock .venv/bin/python -m pyproxy.bench.cold_passes [--mode grpc]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pyproxy.bench.driver import EXCHANGERS, GRPC_CALLER, Exchanger
from pyproxy.bench.procs import Processes, cpu_ns
from pyproxy.bench.profile import LoopbackTarget, setup_for
from pyproxy.bench.results_folder import default_out, publish

WARMUP = 200


def _stage_ns(target: LoopbackTarget) -> int:
    return sum(stage["ns"] for stage in target.stats()["stages"].values())


def _measure(
    targets: Sequence[LoopbackTarget],
    exchangers: Sequence[Exchanger],
    calls: int,
    period_s: float | None,
) -> dict:
    """`calls` calls over the sidecars in turn, back to back or one every `period_s`: per call,
    the sidecars' stage clock and CPU (µs) and the round trip (µs, the mean)."""
    pids = [pid for target in targets for pid in target.pids]
    stages0, cpu0 = sum(map(_stage_ns, targets)), cpu_ns(pids)
    start = due = time.perf_counter()
    busy = 0.0
    for i in range(calls):
        sent = time.perf_counter()
        exchangers[i % len(exchangers)].exchange()
        busy += time.perf_counter() - sent
        if period_s is not None:
            due += period_s
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
    wall = time.perf_counter() - start
    return {
        "stages_us": (sum(map(_stage_ns, targets)) - stages0) / calls / 1e3,
        "cpu_us": (cpu_ns(pids) - cpu0) / calls / 1e3,
        "round_trip_us": busy / calls * 1e6,
        "gap_us": (wall / calls * len(exchangers) - busy / calls) * 1e6,
    }


def run(args: argparse.Namespace) -> dict:
    counts = sorted({int(k) for k in args.sidecars.split(",")} | {1})
    setup = setup_for(args.mode)
    client = GRPC_CALLER if args.mode == "grpc" else args.mode  # as the validation app calls
    rounds: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cold-passes-")))
        procs = Processes()
        stack.callback(procs.stop_all)
        targets = [LoopbackTarget(procs, setup, workdir, pinned=True, work_us=args.work_us)
                   for _ in range(max(counts))]  # fmt: skip
        exchangers = [EXCHANGERS[client](t.proxied, args.size) for t in targets]
        for exchanger in exchangers:
            stack.callback(exchanger.close)
            for _ in range(WARMUP):
                exchanger.exchange()
        for _ in range(args.rounds):
            one = _measure(targets[:1], exchangers[:1], args.calls, None)
            rounds.setdefault("rotation 1", []).append(one)
            plan = [("rotation", k) for k in counts if k > 1] + [("paced", k) for k in counts
                                                                  if k > 1]  # fmt: skip
            random.shuffle(plan)
            for kind, k in plan:
                if kind == "rotation":
                    point = _measure(targets[:k], exchangers[:k], args.calls, None)
                else:
                    period = k * one["round_trip_us"] / 1e6
                    point = _measure(targets[:1], exchangers[:1], args.calls // k, period)
                rounds.setdefault(f"{kind} {k}", []).append(point)
    points = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
              for name, runs in rounds.items()}  # fmt: skip
    return {"mode": args.mode, "sidecars": counts, "points": points, "rounds": rounds}


def table(result: dict) -> str:
    points = result["points"]
    base = points["rotation 1"]
    lines = [
        f"{result['mode']}: per call, medians over rounds; `+` is beyond one sidecar called "
        f"back to back ({base['stages_us']:.1f} µs of stages, {base['cpu_us']:.1f} µs CPU, "
        f"round trip {base['round_trip_us']:.0f} µs)\n",
        "| K | rotation: gap µs | stages µs | CPU µs | paced: gap µs | stages µs | CPU µs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in result["sidecars"][1:]:
        cells = []
        for kind in ("rotation", "paced"):
            p = points[f"{kind} {k}"]
            cells += [f"{p['gap_us']:.0f}", f"+{p['stages_us'] - base['stages_us']:.1f}",
                      f"+{p['cpu_us'] - base['cpu_us']:.1f}"]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("+-", "−")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tcp", "http", "http2", "grpc"), default="grpc")
    parser.add_argument("--sidecars", default="2,4,8", help="K: how many sidecars take turns")
    parser.add_argument("--calls", type=int, default=1500, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=100, help="message size, bytes")
    parser.add_argument("--work-us", type=float, default=100.0, help="the echo's work per call")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    out = args.out or default_out(time.strftime("cold-passes-%Y%m%d-%H%M%S"))
    result = run(args)
    publish(out, result, table(result), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
