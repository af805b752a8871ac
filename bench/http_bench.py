"""HTTP mode benchmark: pyproxy's HTTP/1.1 path beside nginx, haproxy, proxy.py and mitmproxy.

Every proxy runs in the same bench run, in front of the same upstream: a
separate nginx instance answering `return 200` with a 100-byte body (it is not
what is measured, and it is fast). Measured per path:

(a) latency: 100-byte GETs on one kept-alive connection, one request
    outstanding, timed with perf_counter_ns by a small client in this file;
    every process (client, upstream, proxies) pinned to CPU 0 so no path wins
    by spreading work; rounds interleave the paths in shuffled order so
    machine noise hits all alike. Reported: p50/p99 and added p50/p99 over
    the direct path (added p50: median over rounds of the within-round
    difference; added p99: pooled).
(b) throughput: `wrk -t1 -c32` with the proxy under test alone on CPU 1, wrk
    and the upstream on CPU 0: requests/s, and the proxy's CPU use (a core
    saturated or not).
(c) CPU per request: utime+stime of the proxy's processes (all of them, all
    threads; /proc/<pid>/stat) before/after each wrk run, divided by the
    requests wrk completed. Its inverse is requests per proxy CPU-second.
(d) RSS of the proxy's processes after the load (summed over processes).

A lower bound runs beside them: `python_floor.py`, the leanest keep-alive
relay Python can make (no parsing, no accounting), which shows what any
Python proxy pays before doing a proxy's work.
pyproxy runs five times: fast codec (llhttp) with its default express
lane (the C pair), fast with `express_lane: off` (the general path alone,
what the C pair buys), h11 codec, fast with the stage clock off (the clock's
own cost is on - off), and fast with a local rate limit that never limits
(the filtered path). Its stage breakdown is
taken from /stats?format=json deltas over the latency phase (per request,
serial) and over the load phase.
`--baseline-tree PATH` runs another checkout's pyproxy (from PATH/.venv,
which `make .venv/.installed-test` there builds with its native modules)
beside this one in the same run, interleaved: the default and the filtered
configuration again as `before_<name>`, each tree reading the same config.
Reported: after/before ratios of added p50 and CPU per request, each the
median over rounds of that round's ratio; targets: default path ≤ 1.05,
filtered path ≤ 1.00.
proxy.py runs as a *forward* proxy with
absolute-form requests (its reverse-proxy plugin does not serve a second
request on a kept-alive connection: the request times out), mitmproxy as
`mitmdump --mode reverse:`. They come from their own venvs under /tmp
(`--install-peers` creates them; the project venv is never touched); a peer
that is missing is reported as skipped.
HTTP/2: h2load -c32 -m10 (h2c prior knowledge) against haproxy (`bind ...
proto h2`), nginx (`listen ... http2`) and pyproxy, the latter only if
`curl --http2-prior-knowledge` through it succeeds; otherwise reported pending.

Bounded: < 6 minutes with the defaults; progress on stderr; JSON in
bench/results/http_bench/ (bench/results_folder.py); the markdown report on stdout. Every process
started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.filter_configs import filter_entry
from pyproxy.bench.http_load import (
    LOAD_CPU,
    SIDE_CPU,
    Path_,
    log,
    run_load_tool,
    run_wrk,
    wait_http,
)
from pyproxy.bench.procs import (
    Noise,
    Processes,
    add_baseline_tree,
    baseline_tree_python,
    cell,
    cpu_seconds,
    git_state,
    move_to_cpu,
    noise_note,
    on_cpus,
    run_tool,
    target_line,
)
from pyproxy.bench.results_folder import default_out, inputs_of, write_results
from pyproxy.bench.rounds import interleaved, latency_phase, paired_ratio

from pyproxy.stats import stage_table

BODY = peers.BODY  # the upstream's 100-byte answer


# ---- the paths under test (launched by bench/peers.py) ------------------------------------


def rss_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def _path(started: peers.Started, timeout: float = 20.0) -> Path_:
    """A started peer as a path under test, once a GET through it answers."""
    wait_http(started.port, absolute=started.absolute, timeout=timeout)
    return Path_(started.name, started.port, started.pid, admin=started.admin,
                 absolute=started.absolute, note=started.note, h2_port=started.h2_port)  # fmt: skip


def start_upstream(procs: Processes, workdir: Path) -> int:
    return _path(peers.nginx_return_200(procs, workdir, SIDE_CPU)).port


def start_nginx(
    procs: Processes, workdir: Path, upstream: int, name: str = "nginx", location: str = "",
    main: str = "", note: str = "http proxy_pass, keepalive 64 upstream",
) -> Path_:  # fmt: skip
    """nginx `proxy_pass` to the upstream; `location` adds directives to its location block."""
    return _path(peers.nginx_http_proxy(procs, workdir, upstream, SIDE_CPU, name=name,
                                        location=location, main=main, note=note))  # fmt: skip


def start_haproxy(procs: Processes, workdir: Path, upstream: int) -> Path_:
    return _path(peers.haproxy(procs, workdir, upstream, SIDE_CPU, front="both"))


def start_pyproxy(
    procs: Processes,
    workdir: Path,
    name: str,
    upstream: int,
    *,
    http: dict | None = None,
    filters: list[dict] | None = None,
    clock: bool = True,
    python: str = sys.executable,
    note: str = "",
    env: dict | None = None,
) -> Path_:
    """One pyproxy HTTP listener in front of the upstream.

    `http` and `filters` are the listener's sections (left out: the defaults);
    `python` is the interpreter whose installed pyproxy runs, so another
    checkout's venv runs that checkout's code.
    """
    listener: dict = {"mode": "http", "upstream": f"127.0.0.1:{upstream}"}
    if http:
        listener["http"] = http
    if filters:
        listener["filters"] = filters
    started = peers.pyproxy_config(procs, workdir, name, listener, SIDE_CPU, clock=clock,
                                   python=python, env=env, note=note)  # fmt: skip
    return _path(started, timeout=30)  # a Lua or WASM filter takes a moment to load


def start_python_floor(procs: Processes, upstream: int) -> Path_:
    started = peers.python_floor(procs, upstream, SIDE_CPU)
    return _path(started)


def start_proxypy(procs: Processes, workdir: Path, upstream: int) -> Path_ | None:
    try:
        return _path(peers.proxypy(procs, upstream, SIDE_CPU))
    except peers.Skip:
        return None


def start_mitmproxy(procs: Processes, workdir: Path, upstream: int) -> Path_ | None:
    try:
        return _path(peers.mitmproxy(procs, workdir, upstream, SIDE_CPU), timeout=30)
    except peers.Skip:
        return None


# ---- measurements ------------------------------------------------------------------------


def snap_delta(after: dict, before: dict) -> dict:
    """after - before for every number in a /stats snapshot (strings kept from after)."""
    if isinstance(after, dict):
        return {
            k: snap_delta(v, before.get(k, 0) if isinstance(before, dict) else 0)
            for k, v in after.items()
        }
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return after


def parse_h2load(text: str) -> dict:
    out: dict = {}
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if match:
        out["rps"] = float(match.group(3))
    match = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
        text,
    )
    if match:
        out["requests"] = int(match.group(4))
        out["failed"] = int(match.group(5)) + int(match.group(6))
    match = re.search(r"status codes: (\d+) 2xx", text)
    if match:
        out["2xx"] = int(match.group(1))
    return out


def run_h2load(p: Path_, seconds: int) -> dict:
    argv = ["h2load", "-t1", "-c32", "-m10", "-D", str(seconds), f"http://127.0.0.1:{p.h2_port}/"]
    return run_load_tool(p, argv, parse_h2load, seconds)


def under_load(p: Path_, run) -> dict:
    """Run a load generator with the proxy alone on CPU 1; add its CPU per request and RSS."""
    pids = p.pids()
    if pids:
        move_to_cpu(pids, LOAD_CPU)
    cpu0 = cpu_seconds(pids)
    wall0 = time.perf_counter()
    out = run()
    wall = time.perf_counter() - wall0
    if pids:
        cpu = cpu_seconds(pids) - cpu0
        out["proxy_cpu_s"] = cpu
        out["proxy_cpu_util"] = cpu / wall
        out["proxy_cpu_us_per_req"] = cpu / out["requests"] * 1e6 if out["requests"] else None
        out["rss_mib"] = rss_mib(pids)
        out["processes"] = len(pids)
        move_to_cpu(pids, SIDE_CPU)
    return out


def throughput_phase(paths: list[Path_], workdir: Path, rounds: int, seconds: int) -> dict:
    runs: dict[str, list[dict]] = {p.name: [] for p in paths}
    for p in interleaved(paths, rounds, 5, "throughput"):
        runs[p.name].append(under_load(p, lambda p=p: run_wrk(p, workdir, seconds, 32)))
    out = {}
    for name, values in runs.items():
        best = max(values, key=lambda v: v["rps"])
        summary = {
            "rps": best["rps"],
            "rps_rounds": [v["rps"] for v in values],
            "p50_us": best.get("p50_us"),
            "p99_us": best.get("p99_us"),
            "errors": sum(v["non_2xx"] + v["socket_errors"] for v in values),
        }
        if "proxy_cpu_s" in values[0]:
            cpu = sum(v["proxy_cpu_s"] for v in values)
            reqs = sum(v["requests"] for v in values)
            summary["proxy_cpu_util"] = best["proxy_cpu_util"]
            summary["proxy_cpu_us_per_req"] = cpu / reqs * 1e6 if reqs else None
            summary["proxy_cpu_us_per_req_rounds"] = [v["proxy_cpu_us_per_req"] for v in values]
            summary["rps_per_cpu_second"] = reqs / cpu if cpu else None
            summary["rss_mib"] = values[-1]["rss_mib"]
            summary["processes"] = values[-1]["processes"]
        out[name] = summary
    return out


def h2_works(port: int) -> bool:
    if not shutil.which("curl"):
        return False
    run = run_tool(
        ["curl", "-s", "--max-time", "3", "--http2-prior-knowledge", "-o", "/dev/null",
         "-w", "%{http_code} %{http_version}", f"http://127.0.0.1:{port}/"], timeout=10,
    )  # fmt: skip
    return run.stdout.strip() == "200 2"


# ---- main ------------------------------------------------------------------------------


def round_parser(
    doc: str | None, *, rounds: int, requests: int, round_seconds: float, load_rounds: int,
    seconds: int, out: str,
) -> argparse.ArgumentParser:  # fmt: skip
    """An interleaved HTTP bench's command line (its docstring as help), with its defaults."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=rounds, help="latency rounds")
    parser.add_argument("--requests", type=int, default=requests, help="per path per latency round")
    parser.add_argument("--round-seconds", type=float, default=round_seconds,
                        help="cap per path per latency round")  # fmt: skip
    parser.add_argument("--load-rounds", type=int, default=load_rounds, help="load runs per path")
    parser.add_argument("--seconds", type=int, default=seconds, help="load run duration")
    parser.add_argument("--out", default=out)
    return parser


def finish_run(result: dict, out: str, started: float, report: Callable[[dict], str]) -> None:
    """Write the results folder, print the report and where the folder went."""
    result["elapsed_s"] = time.monotonic() - started
    text = report(result)
    write_results(out, result, text, result["config"])
    print(text)
    print(f"\nresults: {out} ({result['elapsed_s']:.0f} s)")


def begin_run(parser: argparse.ArgumentParser, args: argparse.Namespace, tools: tuple) -> dict:
    """Refuse to start without the tools or two CPUs; make SIGTERM/SIGHUP unwind through the
    caller's cleanup (nothing is left running); the header of the results JSON."""
    for tool in tools:
        if not shutil.which(tool):
            parser.error(f"{tool} is needed")
    if (os.cpu_count() or 1) < 2:
        parser.error("two CPUs are needed (proxy alone on CPU 1 under load)")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    return {
        "config": inputs_of(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "git": git_state(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = round_parser(
        __doc__,
        rounds=5,
        requests=2000,
        round_seconds=2.0,
        load_rounds=3,
        seconds=5,
        out=str(default_out("http_bench")),
    )
    parser.add_argument("--install-peers", action="store_true",
                        help="create /tmp venvs with proxy.py and mitmproxy if missing")  # fmt: skip
    parser.add_argument("--allocators", action="store_true",
                        help="also run the default and the general path with PYTHONMALLOC=malloc "
                        "(what the allocator that returns a burst's memory costs per request)")  # fmt: skip
    add_baseline_tree(parser)
    args = parser.parse_args(argv)
    result: dict = {**begin_run(parser, args, ("nginx", "wrk", "taskset")), "skipped": {}}
    baseline_python = baseline_tree_python(parser, args)
    if args.install_peers:
        peers.install_peers(("proxypy", "mitmproxy"))

    started = time.monotonic()
    if args.baseline_tree is not None:
        result["baseline_git"] = git_state(Path(args.baseline_tree).resolve())
    with tempfile.TemporaryDirectory(prefix="pyproxy-http-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            log("starting upstream and proxies (all on CPU 0)")
            upstream = start_upstream(procs, workdir)
            paths = [Path_("direct", upstream, note="nginx return 200, 100 B")]
            paths.append(start_nginx(procs, workdir, upstream))
            if shutil.which("haproxy"):
                paths.append(start_haproxy(procs, workdir, upstream))
            else:
                result["skipped"]["haproxy"] = "not installed"
            for name, http, clock, filters, note in pyproxy_setups(workdir):
                paths.append(start_pyproxy(procs, workdir, name, upstream, http=http,
                                           filters=filters, clock=clock, note=note))  # fmt: skip
                if args.allocators and name in ALLOCATOR_PATHS:
                    paths.append(start_pyproxy(
                        procs, workdir, f"{name}_malloc", upstream, http=http, filters=filters,
                        clock=clock, env=MALLOC_ENV, note=f"{note}, PYTHONMALLOC=malloc",
                    ))  # fmt: skip
                if baseline_python is not None and name in BEFORE_AFTER:
                    paths.append(start_pyproxy(
                        procs, workdir, f"before_{name}", upstream, http=http, filters=filters,
                        clock=clock, python=str(baseline_python), note=f"{note}, baseline tree",
                    ))  # fmt: skip
            paths.append(start_python_floor(procs, upstream))
            for name, starter in (("proxypy", start_proxypy), ("mitmproxy", start_mitmproxy)):
                try:
                    p = starter(procs, workdir, upstream)
                except RuntimeError as exc:
                    p, result["skipped"][name] = None, f"did not start: {exc}"
                if p is None:
                    result["skipped"].setdefault(
                        name,
                        f"not installed in {peers.PEER_VENVS[name][0]} (run with --install-peers)",
                    )
                else:
                    paths.append(p)
            result["paths"] = {p.name: p.note for p in paths}
            pyproxies = [p for p in paths if p.admin]

            # (a) latency: client pinned with everything else to CPU 0.
            log(f"latency: {len(paths)} paths x {args.rounds} rounds")
            with on_cpus(SIDE_CPU):
                for p in pyproxies:
                    p.snaps["start"] = p.stats()
                noise = Noise()
                result["latency"] = latency_phase(
                    paths, args.rounds, args.requests, args.round_seconds, base="direct", seed=4
                )
                result["foreign_cpus"] = {"latency": noise.cpus()}
                for p in pyproxies:
                    p.snaps["after_latency"] = p.stats()

            # (b, c, d) throughput, CPU per request, RSS: proxy alone on CPU 1.
            log(f"throughput: wrk -t1 -c32 -d{args.seconds}s x {args.load_rounds} rounds per path")
            noise = Noise()
            result["throughput"] = throughput_phase(paths, workdir, args.load_rounds, args.seconds)
            result["foreign_cpus"]["throughput"] = noise.cpus()
            for p in pyproxies:
                p.snaps["after_load"] = p.stats()

            # HTTP/2 (h2c prior knowledge), if pyproxy speaks it yet.
            h2_paths = [p for p in paths if p.h2_port]
            py_fast = next(p for p in pyproxies if p.name == "pyproxy_fast")
            if h2_works(py_fast.port):
                py_fast.h2_port = py_fast.port
                h2_paths.append(py_fast)
                result["h2_pyproxy"] = "measured"
            else:
                result["h2_pyproxy"] = "pending: curl --http2-prior-knowledge through pyproxy fails"
            if shutil.which("h2load"):
                log(f"http/2: h2load -c32 -m10 -D {args.seconds} on {[p.name for p in h2_paths]}")
                result["h2"] = {
                    p.name: under_load(p, lambda p=p: run_h2load(p, args.seconds)) for p in h2_paths
                }
                if py_fast in h2_paths:
                    py_fast.snaps["after_h2"] = py_fast.stats()

            # pyproxy's stage breakdown per phase.
            stages = {}
            for p in pyproxies:
                lat = snap_delta(p.snaps["after_latency"], p.snaps["start"])
                load = snap_delta(p.snaps["after_load"], p.snaps["after_latency"])
                stages[p.name] = {
                    "latency": lat["listeners"]["main"],
                    "latency_table": stage_table(lat),
                    "load": load["listeners"]["main"],
                    "load_table": stage_table(load),
                }
                if "after_h2" in p.snaps:
                    h2 = snap_delta(p.snaps["after_h2"], p.snaps["after_load"])
                    stages[p.name]["h2_table"] = stage_table(h2)
            result["stages"] = stages
        finally:
            procs.stop_all()

    result["targets"] = targets(result)
    finish_run(result, args.out, started, report)
    return 0


def pyproxy_setups(workdir: Path) -> list[tuple[str, dict, bool, list[dict], str]]:
    """pyproxy's configurations in this bench: (name, http section, stage clock, filters, note)."""
    ratelimit = [filter_entry("ratelimit", workdir, "pyproxy_ratelimit")]
    fast = {"codec": "fast"}
    return [
        ("pyproxy_fast", fast, True, [], "fast codec, default express lane"),
        ("pyproxy_fast_general", {**fast, "express_lane": "off"}, True, [],
         "fast codec, express_lane: off (the general path alone)"),
        ("pyproxy_h11", {"codec": "h11"}, True, [], "h11 codec"),
        ("pyproxy_fast_clock_off", fast, False, [], "fast codec, stage clock off"),
        ("pyproxy_ratelimit", fast, True, ratelimit,
         "fast codec, default express lane, a local rate limit that never limits"),
    ]  # fmt: skip


# Configurations run from --baseline-tree too, with the most after/before may be: the default
# path within 5 % of before, the filtered path no slower.
BEFORE_AFTER = {"pyproxy_fast": ("default", 1.05), "pyproxy_ratelimit": ("filtered", 1.00)}


# --allocators runs the default path and the general path on the C library's malloc too
# (as <name>_malloc; it lets a worker return a burst's memory, see pyproxy/memory_trim.py),
# so what it costs per request is measured beside the same configuration, in the same rounds.
ALLOCATOR_PATHS = ("pyproxy_fast", "pyproxy_fast_general")
MALLOC_ENV = {"PYTHONMALLOC": "malloc"}


def allocator_ratios(result: dict) -> dict:
    """malloc/pymalloc ratios of added p50 and CPU per request, median of per-round ratios."""
    lat, tput, out = result["latency"], result["throughput"], {}
    direct = lat["direct"]["p50_us_rounds"]
    for pymalloc in ALLOCATOR_PATHS:
        malloc = f"{pymalloc}_malloc"
        if malloc not in lat:
            continue
        added = {n: [a - d for a, d in zip(lat[n]["p50_us_rounds"], direct, strict=True)]
                 for n in (pymalloc, malloc)}  # fmt: skip
        cpu = {n: tput[n]["proxy_cpu_us_per_req_rounds"] for n in (pymalloc, malloc)}
        out[f"{malloc}_vs_pymalloc_added_p50"] = {
            "value": paired_ratio(added[malloc], added[pymalloc])
        }
        out[f"{malloc}_vs_pymalloc_cpu_per_req"] = {
            "value": paired_ratio(cpu[malloc], cpu[pymalloc])
        }
    return out


def before_after(result: dict) -> dict:
    """after/before ratios, median over rounds of each round's ratio, for added p50 and CPU."""
    lat, tput, out = result["latency"], result["throughput"], {}
    direct = lat["direct"]["p50_us_rounds"]
    for name, (label, limit) in BEFORE_AFTER.items():
        before = f"before_{name}"
        if before not in lat:
            continue
        added = {n: [a - d for a, d in zip(lat[n]["p50_us_rounds"], direct, strict=True)]
                 for n in (name, before)}  # fmt: skip
        for measure, ratio in (
            ("added_p50", paired_ratio(added[name], added[before])),
            ("cpu_per_req", paired_ratio(tput[name]["proxy_cpu_us_per_req_rounds"],
                                         tput[before]["proxy_cpu_us_per_req_rounds"])),
        ):  # fmt: skip
            out[f"{label}_{measure}_after_vs_before"] = {
                "value": ratio,
                "target": f"<= {limit:.2f}",
                "met": ratio is not None and ratio <= limit,
            }
    return out


def targets(result: dict) -> dict:
    """The HTTP/1.1 targets for the fast codec, each with the measured ratio and met or not."""
    lat, tput = result["latency"], result["throughput"]
    out = {}
    fast = "pyproxy_fast"
    if lat["nginx"]["added_p50_us"] > 0:
        ratio = lat[fast]["added_p50_us"] / lat["nginx"]["added_p50_us"]
        out["added_p50_vs_nginx"] = {"value": ratio, "target": "<= 1.5", "met": ratio <= 1.5}
    ratio = tput[fast]["rps"] / tput["nginx"]["rps"]
    out["rps_vs_nginx"] = {"value": ratio, "target": ">= 0.35", "met": ratio >= 0.35}
    if tput[fast].get("rps_per_cpu_second") and tput["nginx"].get("rps_per_cpu_second"):
        ratio = tput[fast]["rps_per_cpu_second"] / tput["nginx"]["rps_per_cpu_second"]
        out["rps_per_cpu_second_vs_nginx"] = {
            "value": ratio,
            "target": ">= 0.35",
            "met": ratio >= 0.35,
        }
    if "proxy.py" in tput:
        ratio = tput[fast]["rps"] / tput["proxy.py"]["rps"]
        out["rps_vs_proxypy"] = {"value": ratio}
        per_cpu = tput[fast].get("rps_per_cpu_second"), tput["proxy.py"].get("rps_per_cpu_second")
        if all(per_cpu):
            ratio = per_cpu[0] / per_cpu[1]  # type: ignore[operator]
            out["rps_per_cpu_second_vs_proxypy"] = {
                "value": ratio,
                "target": ">= 6",
                "met": ratio >= 6,
            }
    out.update(before_after(result))
    out.update(allocator_ratios(result))
    off = "pyproxy_fast_clock_off"
    out["stage_clock_cost_p50_us"] = {"value": lat[fast]["p50_us"] - lat[off]["p50_us"]}
    out["stage_clock_cost_cpu_us_per_req"] = {
        "value": tput[fast]["proxy_cpu_us_per_req"] - tput[off]["proxy_cpu_us_per_req"]
    }
    return out


def report(result: dict) -> str:
    lat, tput = result["latency"], result["throughput"]
    lines = [
        "| path | p50 µs | p99 µs | added p50 µs | added p99 µs | req/s, c32 | proxy CPU | "
        "CPU µs/req | req per CPU-s | RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in lat.items():
        t = tput[name]
        util = t.get("proxy_cpu_util")
        lines.append(
            f"| {name} | {v['p50_us']:.1f} | {v['p99_us']:.1f} | "
            + (
                f"{v['added_p50_us']:.1f} | {v['added_p99_us']:.1f}"
                if name != "direct"
                else "— | —"
            )
            + f" | {t['rps']:.0f} | {cell(util * 100 if util else None, '.0f')}{'%' if util else ''} | "
            f"{cell(t.get('proxy_cpu_us_per_req'))} | {cell(t.get('rps_per_cpu_second'), '.0f')} | "
            f"{cell(t.get('rss_mib'))} |" + (f" ({t['errors']} errors)" if t["errors"] else "")
        )
    lines.append("")
    for name, note in result["paths"].items():
        lines.append(f"* {name}: {note}")
    for name, why in result["skipped"].items():
        lines.append(f"* {name}: skipped, {why}")
    lines.append("\n| target (fast codec) | measured | target | met |\n| --- | ---: | ---: | --- |")
    for name, t in result["targets"].items():
        if "met" in t:
            lines.append(
                f"| {name} | {cell(t['value'], '.2f')} | {t['target']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
        else:
            lines.append(f"| {name} | {cell(t['value'], '.2f')} | — | — |")
    if result.get("foreign_cpus"):
        lines.append("\n" + noise_note(result["foreign_cpus"]))
    before_after_lines = [
        target_line(t["met"], f"{name} {t['target']}", cell(t["value"], ".2f"))
        for name, t in result["targets"].items()
        if name.endswith("_after_vs_before")
    ]
    if before_after_lines:
        lines.append("\n" + "\n".join(before_after_lines))
    lines.append(f"\nHTTP/2 through pyproxy: {result.get('h2_pyproxy')}")
    if result.get("h2"):
        lines.append("\n| h2c, h2load -c32 -m10 | req/s | proxy CPU | CPU µs/req | failed |")
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for name, v in result["h2"].items():
            lines.append(
                f"| {name} | {v['rps']:.0f} | {v['proxy_cpu_util'] * 100:.0f}% | "
                f"{cell(v['proxy_cpu_us_per_req'])} | {v.get('failed', 0)} |"
            )
    for name, s in result["stages"].items():
        lines.append(
            f"\n{name}, latency phase (one request outstanding):\n```\n{s['latency_table']}```"
        )
        lines.append(f"{name}, load phase (wrk -c32):\n```\n{s['load_table']}```")
        if "h2_table" in s:
            lines.append(f"{name}, h2 phase:\n```\n{s['h2_table']}```")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
