"""The validation's load, run inside the client pod: the app without and with sidecars, interleaved.

Exchanges alternate between the two deployments (one outstanding request in
all), so both see the same machine: first back to back (closed loop), then,
for each load (a fraction of the meshed closed-loop rate), each paced at that
rate while the CPU time of the given processes is read from /proc (the pod
shares the host's pid namespace). With `--traced ADDR`, a third deployment
(the app exporting OpenTelemetry spans) gets `--traced-requests` requests
after one that sets up its connections. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pyproxy.bench.driver import EXCHANGERS, drive_paired, wait_ready
from pyproxy.bench.procs import cpu_ns, tree_pids

PACED_SAMPLES = 200


def _overhead(without: list[int], with_: list[int]) -> dict:
    """p50s of both, and the overhead measured on each half of the run apart: how far two
    measurements of the same thing, seconds apart, disagree on this machine."""
    half_without, half_with = len(without) // 2, len(with_) // 2
    halves = [
        (statistics.median(with_[:half_with]) - statistics.median(without[:half_without])) / 1000,
        (statistics.median(with_[half_with:]) - statistics.median(without[half_without:])) / 1000,
    ] if half_with and half_without else []  # fmt: skip
    return {
        "p50_without_us": statistics.median(without) / 1000,
        "p50_with_us": statistics.median(with_) / 1000,
        "overhead_halves_us": halves,
    }


def _paced(plain, mesh, seconds: float, rate: float, pids: dict[str, list[int]]) -> dict:
    before = {name: cpu_ns(p) for name, p in pids.items()}
    # Enough exchanges for a median at any rate.
    seconds = max(seconds, PACED_SAMPLES / rate)
    t0 = time.monotonic()
    without, with_ = drive_paired(plain, mesh, seconds, rate=rate, warmup=0)
    wall = time.monotonic() - t0
    return _overhead(without, with_) | {
        "rate": len(with_) / wall,
        "exchanges": len(with_),
        "cores": {name: (cpu_ns(p) - before[name]) / 1e9 / wall for name, p in pids.items()},
    }


def run(args: argparse.Namespace) -> dict:
    make = EXCHANGERS[args.protocol]
    for address in (args.plain, args.mesh):
        wait_ready(args.protocol, address, timeout=args.ready_timeout)
    plain, mesh = make(args.plain, args.size), make(args.mesh, args.size)
    # Once both answer, every worker has forked: the roots' trees are complete.
    pids = {
        name: [pid for root in roots.split(",") if root for pid in tree_pids(int(root))]
        for name, roots in (
            ("sidecars", args.sidecar_roots),
            ("apps_mesh", args.mesh_app_roots),
            ("apps_plain", args.plain_app_roots),
        )
    }
    out: dict = {}
    try:
        # Alternating exchanges: both deployments see the same machine at the same moments.
        t0 = time.monotonic()
        without, with_ = drive_paired(plain, mesh, args.rounds * args.seconds, warmup=20)
        wall = time.monotonic() - t0
        out["closed"] = _overhead(without, with_) | {"rate_with": len(with_) / wall}
        exchanges = 20 + len(with_)  # the warm-up's too: the sidecars' counters include them
        out["paced"] = []
        for load in args.loads:
            rate = load * out["closed"]["rate_with"]
            out["paced"].append(_paced(plain, mesh, args.seconds, rate, pids) | {"load": load})
            exchanges += out["paced"][-1]["exchanges"]
        out["mesh_exchanges"] = exchanges
    finally:
        plain.close()
        mesh.close()
    if args.traced:
        wait_ready(args.protocol, args.traced, timeout=args.ready_timeout)
        traced = make(args.traced, args.size)
        try:
            traced.exchange()  # connections and thread pools set up
            Path(args.trace_file).write_text("")  # neither that nor the probes are the workload
            for _ in range(args.traced_requests):
                traced.exchange()
        finally:
            traced.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", choices=("http", "grpc"), required=True)
    parser.add_argument("--plain", required=True, help="entry address without sidecars")
    parser.add_argument("--mesh", required=True, help="entry address with sidecars")
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",") if x], default=[])
    parser.add_argument("--sidecar-roots", default="", help="pids whose process trees are timed")
    parser.add_argument("--mesh-app-roots", default="")
    parser.add_argument("--plain-app-roots", default="")
    parser.add_argument("--traced", help="entry address of the traced deployment")
    parser.add_argument("--trace-file", help="the file its spans go to (emptied before measuring)")
    parser.add_argument("--traced-requests", type=int, default=20)
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    print(json.dumps(run(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
