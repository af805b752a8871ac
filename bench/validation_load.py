"""The validation's load, run inside the client pod: the app without and with sidecars, interleaved.

Each phase (back to back, the closed loop; then, for each load, both paced at
that fraction of the meshed closed-loop rate) is `--rounds` rounds: within a
round the exchanges alternate between the two deployments (one outstanding
request in all), so both see the same machine, and which goes first swaps
from round to round; each round starts with a discarded warm-up. A phase's
overhead is the median of its rounds' own p50 differences, and the sidecars'
CPU the median of their rounds' CPU per exchange (from /proc: the pod shares
the host's pid namespace), each also given for the first and the second half
of the rounds apart, the measurement's own repeatability. With `--closed-rate R` the closed
loop is not run and the loads are paced at fractions of R (a closed loop an earlier run
measured: `validate --interleave` runs one phase per invocation). With `--traced ADDR`, a third deployment
(the app exporting OpenTelemetry spans) gets `--traced-requests` requests
after one that sets up its connections; `traced_from_ns` is when they began (wall clock, as spans
are stamped). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pyproxy.bench.driver import EXCHANGERS, drive_paired, wait_ready
from pyproxy.bench.procs import cpu_ns, move_to_cpu, run_delay_ns, shield, tree_pids

# Exchanges per deployment per round at least, however low the rate: a round's own p50 needs them.
ROUND_SAMPLES = 40
ROUND_WARMUP = 5


def _median_pair(values: list[float]) -> tuple[float, float]:
    """The medians of the first and the second half of `values` (the same value twice for one)."""
    half = max(1, len(values) // 2)
    return statistics.median(values[:half]), statistics.median(values[half:] or values[:half])


def summarize(rounds: list[dict]) -> dict:
    """The overhead of a phase from its rounds: each round's own p50 difference (with - without,
    its exchanges interleaved), and the median of those, so drift between rounds cancels and a
    round struck by the machine's other load moves nothing. The sidecars' CPU per exchange is the
    median over the rounds too. `*_halves` are the same medians over the first and the second
    half of the rounds: how far two measurements of the same thing, seconds apart, disagree."""
    if not rounds:
        raise ValueError("a phase needs at least one round")
    diffs = [r["p50_with_us"] - r["p50_without_us"] for r in rounds]
    out = {
        "overhead_us": statistics.median(diffs),
        "overhead_halves_us": list(_median_pair(diffs)) if len(rounds) > 1 else [],
        "rounds_overhead_us": diffs,
        "p50_without_us": statistics.median(r["p50_without_us"] for r in rounds),
        "p50_with_us": statistics.median(r["p50_with_us"] for r in rounds),
        "exchanges": sum(r["exchanges"] for r in rounds),
    }
    wall = sum(r["wall_s"] for r in rounds)
    out["rate"] = out["exchanges"] / wall
    if all("cpu_ns" in r for r in rounds):
        names = rounds[0]["cpu_ns"]
        per_exchange = {n: [r["cpu_ns"][n] / r["exchanges"] for r in rounds] for n in names}
        # cores at the phase's rate, from the median CPU per exchange
        out["cores"] = {
            n: statistics.median(v) * out["rate"] / 1e9 for n, v in per_exchange.items()
        }
        # µs each group waited, runnable, for its CPU per request (median over the rounds)
        out["run_delay_us"] = {
            n: statistics.median(r["run_delay_ns"][n] / r["exchanges"] for r in rounds) / 1000
            for n in names
            if all("run_delay_ns" in r for r in rounds)
        }
        out["cores_halves"] = {
            n: [h * out["rate"] / 1e9 for h in _median_pair(v)] for n, v in per_exchange.items()
        } if len(rounds) > 1 else {}  # fmt: skip
    return out


def measure_rounds(
    plain,
    mesh,
    rounds: int,
    seconds: float,
    rate: float | None,
    pids: dict[str, list[int]],
    warmup: int = ROUND_WARMUP,
) -> dict:
    """`rounds` rounds, each `seconds` long (at least ROUND_SAMPLES exchanges each way), the two
    deployments' exchanges alternating within a round (one outstanding request in all) and which
    goes first swapping from round to round (ABBA), each round's first `warmup` pairs discarded;
    the CPU time of `pids` read from /proc around each round."""
    measured = []
    if rate:
        seconds = max(seconds, ROUND_SAMPLES / rate)
    for i in range(rounds):
        pair = (plain, mesh) if i % 2 == 0 else (mesh, plain)
        for _ in range(warmup):
            for exchanger in pair:
                exchanger.exchange()
        before = {name: cpu_ns(p) for name, p in pids.items()}
        waited = {name: run_delay_ns(p) for name, p in pids.items()}
        first, second = drive_paired(*pair, seconds, rate=rate, warmup=0)
        cpu = {name: cpu_ns(p) - before[name] for name, p in pids.items()}
        # how long they waited, runnable, for their CPU: time inside a timed stage or a
        # round trip that is neither the process's work nor its hand-offs
        waited = {name: run_delay_ns(p) - waited[name] for name, p in pids.items()}
        without, with_ = (first, second) if i % 2 == 0 else (second, first)
        if not without or not with_:
            raise RuntimeError(f"round {i}: no exchange completed in {seconds:g} s")
        measured.append({
            "p50_without_us": statistics.median(without) / 1000,
            "p50_with_us": statistics.median(with_) / 1000,
            "exchanges": len(with_),
            "wall_s": seconds,
            "cpu_ns": cpu,
            "run_delay_ns": waited,
        })  # fmt: skip
    return summarize(measured) | {"rounds": measured}


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
    # the load itself: on CPU 0 with the apps (--pin), its gRPC or HTTP client's work is on
    # both deployments' path and shares their CPU
    pids["load"] = [os.getpid()]
    shielded = False
    if args.pin:
        # the traced deployment too: its spans describe the plain app as it is placed
        traced_apps = [
            pid for r in args.traced_app_roots.split(",") if r for pid in tree_pids(int(r))
        ]
        apps = pids["apps_mesh"] + pids["apps_plain"] + traced_apps + [os.getpid()]
        move_to_cpu(apps, 0)
        move_to_cpu(pids["sidecars"], 1)
        if args.shield:
            shielded = shield(apps + pids["sidecars"])
    out: dict = {"shielded": shielded}
    try:
        exchanges = 0
        if args.closed_rate is None:
            closed = measure_rounds(plain, mesh, args.rounds, args.seconds, None, pids, warmup=20)
            out["closed"] = closed | {"rate_with": closed["rate"]}
            exchanges += sum(20 + r["exchanges"] for r in closed["rounds"])
        closed_rate = args.closed_rate if args.closed_rate is not None else closed["rate"]
        out["paced"] = []
        for load in args.loads:
            rate = load * closed_rate
            paced = measure_rounds(plain, mesh, args.rounds, args.seconds, rate, pids)
            out["paced"].append(paced | {"load": load})
            exchanges += sum(ROUND_WARMUP + r["exchanges"] for r in paced["rounds"])
        # the sidecars' counters include the warm-ups' exchanges too
        out["mesh_exchanges"] = exchanges
    finally:
        plain.close()
        mesh.close()
    if args.traced:
        wait_ready(args.protocol, args.traced, timeout=args.ready_timeout)
        traced = make(args.traced, args.size)
        try:
            traced.exchange()  # connections and thread pools set up
            # the traces that began from now on are the workload's (not the probes', not that one's)
            out["traced_from_ns"] = time.time_ns()
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
    parser.add_argument(
        "--closed-rate",
        type=float,
        help="the meshed closed-loop rate an earlier run measured: no closed loop now, the loads "
        "paced at fractions of this rate",
    )
    parser.add_argument("--traced", help="entry address of the traced deployment")
    parser.add_argument("--traced-app-roots", default="", help="pinned with the apps (--pin)")
    parser.add_argument("--traced-requests", type=int, default=20)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="every app and this load on CPU 0, every sidecar on CPU 1, once all are up",
    )
    parser.add_argument(
        "--shield",
        action="store_true",
        help="with --pin, every app, sidecar and this load SCHED_FIFO (procs.shield): the "
        "machine's other tasks cannot hold them off their CPUs",
    )
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    print(json.dumps(run(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
