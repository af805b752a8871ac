"""What a sidecar pass costs after its process waited, on a CPU that idled or ran other sidecars.

`predict` prices a sidecar's wake-up on shared CPUs by its idle curve at the gap its CPU idled
before the pass, plus the setup's busy share of what the curve adds for the rest of its own
wait (`IdleCurve.after_gaps`). The profile measures that share for each setup with
`profile.busy_points` at one K; this bench runs the same measurement at several and prints it.
K sidecars of one setup, each with its echo (100 µs of work), run alone on CPU 1; the driver
and the echoes on CPU 0. Each sidecar waits about K round trips between its calls, two ways:

* **taking turns**: the driver calls the K sidecars in turn, back to back. CPU 1 never idles,
  yet each sidecar waits while the K − 1 others pass their calls.
* **paced**: one sidecar, called once every K of its round trips. Its CPU idles as long.

Per call: the sidecars' stage clock (`/stats`) and CPU (`/proc`) beyond one sidecar called
back to back, medians over rounds. Where taking turns costs what pacing does, the wait is what
costs (the sidecar's code and data gone cold whatever ran): busy share 1. Where it costs
nothing, waking the idle CPU is: busy share 0.

    flock /tmp/pyproxy-bench.lock .venv/bin/python -m pyproxy.bench.cold_passes [--mode grpc]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pyproxy.bench.model import fit_busy_share
from pyproxy.bench.profile import busy_points, setup_for
from pyproxy.bench.results_folder import default_out, publish


def _extra(point: dict, kind: str, figure: str) -> float:
    """The median over rounds of a figure beyond one sidecar called back to back, in µs."""
    return (
        statistics.median(
            k - o for k, o in zip(point[f"{kind}_{figure}"], point[f"one_{figure}"], strict=True)
        )
        / 1e3
    )


def table(mode: str, points: list[dict]) -> str:
    first = points[0]
    base = {f: statistics.median(first[f"one_{f}"]) / 1e3 for f in ("stage_ns", "cpu_ns",
                                                                    "round_trip_ns")}  # fmt: skip
    lines = [
        f"{mode}: per call, medians over rounds, beyond one sidecar called back to back "
        f"({base['stage_ns']:.1f} µs of stages, {base['cpu_ns']:.1f} µs CPU, round trip "
        f"{base['round_trip_ns']:.0f} µs)\n",
        "| K | taking turns: wait µs | stages µs | CPU µs | paced: wait µs | stages µs | CPU µs "
        "| busy share |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point in points:
        cells = []
        for kind in ("turns", "paced"):
            cells += [f"{statistics.median(point[f'{kind}_gap_ns']) / 1e3:.0f}",
                      f"{_extra(point, kind, 'stage_ns'):+.1f}",
                      f"{_extra(point, kind, 'cpu_ns'):+.1f}"]  # fmt: skip
        share = fit_busy_share([point])
        lines.append(f"| {point['turns']} | " + " | ".join(cells) + f" | {share:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tcp", "http", "http2", "grpc"), default="grpc")
    parser.add_argument("--sidecars", default="2,4,8", help="K: how many sidecars take turns")
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=100, help="message size, bytes")
    parser.add_argument("--work-us", type=float, default=100.0, help="the echo's work per call")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    turns = sorted({int(k) for k in args.sidecars.split(",")})
    out = args.out or default_out(time.strftime("cold-passes-%Y%m%d-%H%M%S"))
    with tempfile.TemporaryDirectory(prefix="cold-passes-") as workdir:
        points = busy_points(setup_for(args.mode), Path(workdir), args.work_us, args.size,
                             args.calls, args.rounds, turns)  # fmt: skip
    publish(out, {"mode": args.mode, "points": points}, table(args.mode, points), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
