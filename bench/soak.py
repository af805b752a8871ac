"""Soak: HTTP mode with every filter on, held near capacity; memory and fds must not grow.

One pyproxy worker runs a chain of all five built-in filters, started as
filter_bench starts it (fault at 0 %, a rate limit far above the load, tap
recording every request, Lua and WebAssembly no-ops; the stage clock counts
each filter's runs), in front of nginx answering ``ok:<path>:soak``. The load is bench/steady_load.py: keep-alive
clients sending POSTs one at a time, every request accounted for.

1. Capacity: the clients go flat out for ``--capacity-seconds``; answered
   requests per second is the capacity of this proxy on this machine, with
   this driver.
2. Soak: the same clients paced at ``--fraction`` of that for ``--seconds``
   (``SOAK_SECONDS`` in ``make soak``). The RSS of the proxy's processes and
   their open fds are sampled every ``SAMPLE_EVERY`` seconds.

It fails (exit 1) if any request was lost, misanswered or answered other
than 200, or if, after warm-up (the first quarter of the run, at most 60 s),
memory or fds grew: the median of the last five samples may exceed the
median of the five samples right after warm-up by at most
``RSS_GROWTH_LIMIT_MIB`` of RSS and ``FD_GROWTH_LIMIT`` fds. Progress goes to
stderr, the result to bench/results/soak.json and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.filter_bench import CHAIN_ORDER, sanity, start_proxy
from pyproxy.bench.http_bench import Processes, rss_mib
from pyproxy.bench.http_load import log, wait_http
from pyproxy.bench.procs import get_json
from pyproxy.bench.results_folder import default_out, write_results
from pyproxy.bench.steady_load import Counts, SteadyLoad

CLIENTS = 16
SAMPLE_EVERY = 2.0
WINDOW = 5  # samples in each median
RSS_GROWTH_LIMIT_MIB = 4.0
FD_GROWTH_LIMIT = 4


def start_upstream(procs: Processes, workdir: Path) -> int:
    port = peers.nginx_return_200(procs, workdir, None, body="ok:$uri:soak").port
    wait_http(port)
    return port


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def errors(counts: Counts) -> int:
    return counts.lost + counts.wrong + sum(n for s, n in counts.statuses.items() if s != 200)


def measure_capacity(port: int, seconds: float) -> float:
    load = SteadyLoad(port, CLIENTS, keep_ids=False).start()
    time.sleep(seconds)
    counts = load.stop()
    if errors(counts):
        raise SystemExit(f"capacity run had errors: {counts}")
    return counts.answered / seconds


def soak(port: int, pids: list[int], rate: float, seconds: float, warmup: float) -> dict:
    samples: list[dict] = []
    load = SteadyLoad(port, CLIENTS, rate, keep_ids=False).start()
    started = time.monotonic()
    next_report = started
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            samples.append(
                {
                    "t": round(elapsed, 1),
                    "rss_mib": round(rss_mib(pids), 2),
                    "fds": open_fds(pids),
                    "answered": load.counts.answered,
                }
            )
            if time.monotonic() >= next_report:
                last = samples[-1]
                log(
                    f"soak {elapsed:5.0f}/{seconds:.0f}s: {last['answered']} answered, "
                    f"RSS {last['rss_mib']:.1f} MiB, {last['fds']} fds, errors {errors(load.counts)}"
                )
                next_report += 10
            time.sleep(SAMPLE_EVERY)
    finally:
        counts = load.stop()
    after_warmup = [s for s in samples if s["t"] >= warmup][:WINDOW]
    end = samples[-WINDOW:]
    figures = {
        "rss_mib": {
            "start": samples[0]["rss_mib"],
            "after_warmup": statistics.median(s["rss_mib"] for s in after_warmup),
            "end": statistics.median(s["rss_mib"] for s in end),
            "max": max(s["rss_mib"] for s in samples),
        },
        "fds": {
            "start": samples[0]["fds"],
            "after_warmup": statistics.median(s["fds"] for s in after_warmup),
            "end": statistics.median(s["fds"] for s in end),
        },
    }
    elapsed = time.monotonic() - started
    return {
        "seconds": round(elapsed, 1),
        "warmup_seconds": warmup,
        "target_rate": round(rate),
        "achieved_rate": round(counts.answered / elapsed),
        "sent": counts.sent,
        "answered": counts.answered,
        "lost": counts.lost,
        "wrong": counts.wrong,
        "statuses": {str(k): v for k, v in counts.statuses.items()},
        "errors": errors(counts),
        **figures,
        "samples": samples,
    }


def filters_ran(admin: int) -> dict:
    """Every filter's runs and counters over the whole run (capacity and soak), and whether each
    ran on every request without acting (filter_bench's sanity rules)."""
    main = get_json(f"http://127.0.0.1:{admin}/stats?format=json")["listeners"]["main"]
    events = {kind: main["stages"][f"filter:{kind}"]["events"] for kind in CHAIN_ORDER}
    costs = {"events": events, "counters": main["filters"], "requests": main["requests"]}
    return {**costs, "problems": sanity("soak", CHAIN_ORDER, costs)}


def verdict(result: dict) -> list[str]:
    problems = list(result["filters"]["problems"])
    if result["errors"]:
        problems.append(f"{result['errors']} requests lost, misanswered or not 200")
    rss, fds = result["rss_mib"], result["fds"]
    if rss["end"] - rss["after_warmup"] > RSS_GROWTH_LIMIT_MIB:
        problems.append(
            f"RSS grew {rss['end'] - rss['after_warmup']:.1f} MiB after warm-up "
            f"(limit {RSS_GROWTH_LIMIT_MIB} MiB)"
        )
    if fds["end"] - fds["after_warmup"] > FD_GROWTH_LIMIT:
        problems.append(f"fds grew by {fds['end'] - fds['after_warmup']} after warm-up")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--fraction", type=float, default=0.8, help="of measured capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    warmup = min(60.0, args.seconds / 4)
    with tempfile.TemporaryDirectory(prefix="pyproxy-soak-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            upstream = start_upstream(procs, workdir)
            proxy = start_proxy(procs, workdir, "soak", CHAIN_ORDER, upstream)
            port, admin = proxy.port, proxy.admin
            assert admin is not None
            log(f"capacity: {CLIENTS} clients flat out for {args.capacity_seconds:.0f}s")
            capacity = measure_capacity(port, args.capacity_seconds)
            rate = capacity * args.fraction
            log(
                f"capacity {capacity:.0f} req/s; soaking at {rate:.0f} req/s for {args.seconds:.0f}s"
            )
            result = soak(port, proxy.pids(), rate, args.seconds, warmup)
            result["capacity_rate"] = round(capacity)
            result["fraction"] = args.fraction
            result["filters"] = filters_ran(admin)
            with open(workdir / "soak.log") as f:
                result["proxy_log_tail"] = f.read().splitlines()[-5:]
        finally:
            procs.stop_all()
    result["problems"] = verdict(result)
    summary = {k: v for k, v in result.items() if k != "samples"}
    text = json.dumps(summary, indent=2)
    write_results(default_out("soak"), result, f"```json\n{text}\n```\n", args)
    print(text)
    for problem in result["problems"]:
        log(f"FAIL: {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
