"""TCP mode beside nginx stream, in one run: added echo latency, bulk throughput, CPU per message and per GB.

Paths: direct (no proxy), nginx stream, pyproxy with the copy relay (its
default: the step run by libuv on uvloop), with the splice relay, with the
copy relay and the stage clock off (the clock's own cost is on - off), and
with the copy relay's step run by the event loop's reader
(`--relay-dispatch loop`, the default before); `--baseline-tree PATH` adds
that checkout's copy and splice relays (`before_copy`, `before_splice`, from
PATH/.venv) to the same rounds, so a change is measured against its starting
point beside nginx.

Latency: 100-byte messages at one outstanding message; every process on
CPU 0 so no configuration wins by spreading work. The instrument (client and
echo upstream) is the C pair in native/echo_rtt.c by default: the same
program behind every proxy, with no interpreter whose scheduling depends on
the proxy in front of it (`--instrument python`: bench/echo_client.py and
bench/echo_server.py, the earlier instrument). Rounds visit the paths in
a new shuffled order each time; per path and round: p50, p99 and the
proxy's CPU per message (schedstat). Added p50 is the median over rounds of
(path p50 - direct p50) within the round, and "vs nginx" the median over
rounds of the within-round ratio of added p50s (the host's slow spells hit
a round's paths alike, so paired figures survive them).
Bulk: iperf3 -t SECONDS through each path, interleaved and shuffled the same
way; every proxy on CPU 1 alone, the iperf3 client and server on CPU 0.
Per path and round: Gbit/s and the proxy's CPU seconds per GB moved; the
ratio to nginx stream is the median of within-round ratios.
Each phase reports the CPU the rest of the machine took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.echo_client import measure_rtts, measure_rtts_native, summarize
from pyproxy.bench.procs import (
    Noise,
    Processes,
    add_baseline_tree,
    add_halt_poll_option,
    baseline_tree_python,
    cpu_ns,
    get_json,
    git_state,
    halt_poll_refused,
    halt_polling,
    noise_note,
    on_cpus,
    run_tool,
    target_line,
    tree_pids,
)
from pyproxy.bench.results_folder import default_out, inputs_of, publish

from pyproxy.stats import stage_table


def start_nginx(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None
) -> peers.Started | None:
    """nginx stream in front of the upstream, once it accepts (None: not installed here)."""
    try:
        return peers.nginx_stream(procs, workdir, upstream, cpu).ready()
    except peers.Skip:
        return None


def start_pyproxy(
    procs: Processes, name: str, upstream: int, cpu: int | None, *extra: str,
    python: str = sys.executable,
) -> peers.Started:  # fmt: skip
    """A TCP-mode pyproxy (`python`'s checkout), once it and its admin server accept."""
    return peers.pyproxy_flags(procs, name, upstream, cpu, *extra, python=python).ready()


def iperf3(port: int, seconds: int) -> float | None:
    """Gbit/s received through the given port (iperf3 server behind it)."""
    if not shutil.which("iperf3"):
        return None
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    run = run_tool(argv, 0, timeout=seconds + 30)
    for _attempt in range(3):
        try:
            report = json.loads(run.stdout)
            return report["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            # The single-client iperf3 server may still be finishing the previous test.
            print(f"  iperf3 via {port}: {run.stdout[-200:]!r}; retrying", file=sys.stderr)
            time.sleep(1)
            run = run_tool(argv, 0, timeout=seconds + 30)
    return None


NGINX_ADDED_P50 = 1.0  # pyproxy's added p50 ≤ nginx stream's
NGINX_BULK = 1.0  # splice bulk ≥ nginx stream's
# pyproxy flags per configuration; with a baseline tree, those in BEFORE run from it too.
PYPROXY = {
    "pyproxy_copy": (),
    "pyproxy_splice": ("--relay", "splice"),
    "pyproxy_clock_off": ("--no-stage-clock",),
    "pyproxy_loop": ("--relay-dispatch", "loop"),
}
BEFORE = {"before_copy": "pyproxy_copy", "before_splice": "pyproxy_splice"}


class Target:
    """One path: its port and, for a proxy, the pids whose CPU is its cost."""

    def __init__(self, name: str, port: int, pid: int | None = None, admin: int | None = None):
        self.name, self.port, self.pid, self.admin = name, port, pid, admin

    def cpu(self) -> int:
        return cpu_ns(tree_pids(self.pid)) if self.pid else 0


def start_targets(
    procs: Processes, workdir: Path, upstream: int, cpu: int, baseline: Path | None,
    bulk: bool,
) -> list[Target]:  # fmt: skip
    """direct, nginx stream (if installed) and every pyproxy configuration, all on `cpu`."""
    targets = [Target("direct", upstream)]
    nginx = start_nginx(procs, workdir, upstream, cpu)
    if nginx is not None:
        targets.append(Target("nginx", nginx.port, nginx.pid))
    runs = [(name, flags, sys.executable) for name, flags in PYPROXY.items()]
    if baseline is not None:
        runs += [(name, PYPROXY[now], str(baseline)) for name, now in BEFORE.items()]
    for name, flags, python in runs:
        if bulk and name == "pyproxy_clock_off":
            continue
        started = start_pyproxy(procs, name, upstream, cpu, *flags, python=python)
        targets.append(Target(name, started.port, started.pid, started.admin))
    return targets


def shuffled(targets: list[Target], rounds: int, seed: int, phase: str):
    """Every target once per round, in a new shuffled order each round (progress on stderr)."""
    order = list(targets)
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        yield r, order
        print(f"  {phase} round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def round_trips(instrument: str, port: int, count: int) -> list[int]:
    """100 B round trips through `port` by the instrument's client (this process's CPU: 0)."""
    if instrument == "c":
        return measure_rtts_native(f"127.0.0.1:{port}", count, 100, LATENCY_WARMUP, 0)
    return measure_rtts(f"127.0.0.1:{port}", count, warmup=LATENCY_WARMUP)


LATENCY_WARMUP = 100
INSTRUMENTS = {
    "c": "the C client and C echo upstream (native/echo_rtt.c)",
    "python": "the Python client and echo upstream (bench/echo_client.py, bench/echo_server.py)",
}


def latency(targets: list[Target], rounds: int, per_round: int, instrument: str) -> dict[str, dict]:
    samples: dict[str, list[int]] = {t.name: [] for t in targets}
    p50s: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, list[float]] = {t.name: [] for t in targets}
    for _r, order in shuffled(targets, rounds, 7, "latency"):
        for t in order:
            before = t.cpu()
            rtts = round_trips(instrument, t.port, per_round)
            cpu[t.name].append((t.cpu() - before) / (per_round + LATENCY_WARMUP) / 1000)
            samples[t.name] += rtts
            p50s[t.name].append(summarize(rtts)["p50_us"])
    out = {}
    direct, nginx = p50s["direct"], p50s.get("nginx")
    for name, values in samples.items():
        row = summarize(values)
        added = [a - b for a, b in zip(p50s[name], direct, strict=True)]
        row["p50_us_rounds"] = p50s[name]
        row["added_p50_us"] = statistics.median(added)
        row["added_p99_us"] = row["p99_us"] - summarize(samples["direct"])["p99_us"]
        if name != "direct":
            row["proxy_cpu_us_per_msg"] = statistics.median(cpu[name])
        if nginx and name not in ("direct", "nginx"):
            nginx_added = [a - b for a, b in zip(nginx, direct, strict=True)]
            ratios = [a / b for a, b in zip(added, nginx_added, strict=True) if b > 0]
            row["added_p50_vs_nginx"] = statistics.median(ratios) if ratios else None
        out[name] = row
    return out


def bulk(targets: list[Target], rounds: int, seconds: int) -> dict[str, dict]:
    runs: dict[str, list[tuple[float, float | None]]] = {t.name: [] for t in targets}
    for _r, order in shuffled(targets, rounds, 11, "bulk"):
        for t in order:
            before = t.cpu()
            gbps = iperf3(t.port, seconds)
            used = t.cpu() - before
            if gbps is None:
                runs[t.name].append((0.0, None))
                continue
            runs[t.name].append((gbps, used / 1e9 / (gbps * seconds / 8) if t.pid else None))
    out = {}
    nginx = runs.get("nginx")
    for name, values in runs.items():
        rates = [v[0] for v in values]
        cpu = [v[1] for v in values if v[1] is not None]
        row: dict = {
            "gbps_rounds": rates,
            "gbps": statistics.median(rates),
            "cpu_s_per_gb": statistics.median(cpu) if cpu else None,
        }
        if nginx and name != "nginx":
            ratios = [a[0] / b[0] for a, b in zip(values, nginx, strict=True) if b[0] > 0]
            row["vs_nginx"] = statistics.median(ratios) if ratios else None
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--messages", type=int, default=4000, help="per path per latency round")
    parser.add_argument("--instrument", choices=("c", "python"), default="c",
                        help="latency client and echo upstream: the C pair or the Python pair")  # fmt: skip
    parser.add_argument("--bulk-rounds", type=int, default=3,
                        help="interleaved iperf3 rounds (0: no bulk phase)")  # fmt: skip
    parser.add_argument("--seconds", type=int, default=4, help="iperf3 duration per path")
    parser.add_argument("--out", default=str(default_out("tcp_echo")), help="results folder")
    add_baseline_tree(parser)
    add_halt_poll_option(parser)
    args = parser.parse_args(argv)
    baseline = baseline_tree_python(parser, args)
    if refused := halt_poll_refused(args.halt_poll_ns):
        parser.error(refused)
    result: dict = {
        "config": inputs_of(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "git": git_state(),
        "foreign_cpus": {},
    }
    if baseline is not None:
        result["baseline_git"] = git_state(baseline.parents[2])
    started = time.monotonic()
    procs = Processes()
    # the echo client beside the app, like every latency target
    with (
        halt_polling(args.halt_poll_ns) as polled,
        on_cpus(0),
        tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp,
    ):
        result["machine"]["halt_poll_ns"] = polled
        workdir = Path(tmp)
        try:
            upstream = peers.native_echo_server if args.instrument == "c" else peers.echo_server
            echo = upstream(procs, 0).ready().port
            targets = start_targets(procs, workdir, echo, 0, baseline, bulk=False)
            time.sleep(0.5)  # notify calibration done before anything is measured
            noise = Noise()
            result["latency"] = latency(targets, args.rounds, args.messages, args.instrument)
            result["foreign_cpus"]["latency"] = noise.cpus()
            clock = {t.name: t for t in targets}
            lat = result["latency"]
            result["stage_clock_cost_p50_us"] = (
                lat["pyproxy_copy"]["p50_us"] - lat["pyproxy_clock_off"]["p50_us"]
            )
            admin = clock["pyproxy_copy"].admin
            snap = get_json(f"http://127.0.0.1:{admin}/stats?format=json")
            result["stages"] = snap["listeners"]["main"]
            result["stage_table"] = stage_table(snap)
            procs.stop_all()

            if args.bulk_rounds > 0 and shutil.which("iperf3"):
                procs = Processes()
                server = peers.iperf3_server(procs, 0).ready().port
                targets = start_targets(procs, workdir, server, 1, baseline, bulk=True)
                noise = Noise()
                result["bulk"] = bulk(targets, args.bulk_rounds, args.seconds)
                result["foreign_cpus"]["bulk"] = noise.cpus()
        finally:
            procs.stop_all()
    result["elapsed_s"] = time.monotonic() - started
    publish(args.out, result, report(result), args)
    return 0


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def report(result: dict) -> str:
    instrument = INSTRUMENTS[result["config"].get("instrument", "python")]
    lines = [
        f"Latency instrument: {instrument}.\n",
        "| 100 B echo | p50 µs | p99 µs | added p50 µs | vs nginx | proxy CPU µs/msg |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lat = result["latency"]
    for name, v in lat.items():
        lines.append(
            f"| {name} | {v['p50_us']:.1f} | {v['p99_us']:.1f} | {v['added_p50_us']:.1f} | "
            f"{_f(v.get('added_p50_vs_nginx'), '.2f')} | {_f(v.get('proxy_cpu_us_per_msg'), '.1f')} |"
        )
    lines.append(f"stage clock cost (p50, on − off): {result['stage_clock_cost_p50_us']:.2f} µs")
    out = result.get("bulk", {})
    if out:
        lines.append("\n| bulk (iperf3) | Gbit/s (median) | vs nginx | proxy CPU s/GB | rounds |")
        lines.append("| --- | ---: | ---: | ---: | --- |")
        for name, v in out.items():
            rounds = " ".join(f"{g:.2f}" for g in v["gbps_rounds"])
            lines.append(
                f"| {name} | {v['gbps']:.2f} | {_f(v.get('vs_nginx'), '.2f')} | "
                f"{_f(v['cpu_s_per_gb'], '.3f')} | {rounds} |"
            )
    lines.append("\n" + noise_note(result["foreign_cpus"]))
    for name in ("pyproxy_copy", "pyproxy_loop", "pyproxy_splice", "before_copy", "before_splice"):
        ratio = lat.get(name, {}).get("added_p50_vs_nginx")
        if ratio is not None:
            lines.append(target_line(ratio <= NGINX_ADDED_P50, f"{name} 100 B added p50 ≤ 1.0× nginx stream's", f"{ratio:.2f}×"))  # fmt: skip
    for name in ("pyproxy_splice", "before_splice"):
        ratio = out.get(name, {}).get("vs_nginx")
        if ratio is not None:
            lines.append(target_line(ratio >= NGINX_BULK, f"{name} bulk ≥ 1.0× nginx stream's", f"{ratio:.2f}×"))  # fmt: skip
    lines.append("\n```\n" + result["stage_table"] + "```")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
