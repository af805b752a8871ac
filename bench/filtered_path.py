"""The filtered path beside nginx: what one header-only filter costs pyproxy, and nginx with Lua.

A sidecar almost always runs filters, so this bench measures pyproxy's HTTP/1.1
path with one cheap filter against nginx doing the same work, all in one run,
in front of the same upstream (http_bench's nginx answering `return 200` with
a 100-byte body):

* pyproxy with no filter (the default configuration);
* pyproxy + a local rate limit that never limits (10^9 tokens);
* pyproxy + a one-line Lua request-header filter
  (`handle:headers():add("x-bench", "1")` in `envoy_on_request`);
* pyproxy + the same line on the response (`envoy_on_response`);
* nginx `proxy_pass` (keepalive 64 upstream);
* nginx + ngx_http_lua adding the request header (`access_by_lua_block`,
  `ngx.req.set_header`) and the response header (`header_filter_by_lua_block`,
  `ngx.header[...]`), Debian's `libnginx-mod-http-lua`.

Measured per path, rounds interleaved in shuffled order so the host's noise
hits all alike, medians over rounds reported:

(1) CPU per request: `wrk -t1 -c32` 100 B GETs with the proxy alone on CPU 1
    (wrk and the upstream on CPU 0); utime+stime of the proxy's processes at
    ns resolution (/proc/<pid>/task/*/schedstat) over each run ÷ the requests
    wrk completed; and req/s.
(2) added p50: GETs at one request outstanding on one kept-alive connection,
    every process on CPU 0, p50 minus the direct path's p50 in the same round.
(3) pyproxy's filter stage per request, from /stats deltas over the load phase.

Targets (one run): the rate limit adds ≤ 3 µs CPU per request to the no-filter
figure (median over rounds of the within-round difference); each Lua header
filter costs ≤ 1.5 × the CPU per request of nginx + ngx_http_lua doing the same
(median over rounds of the within-round ratio).

Bounded: ≈ 3 minutes with the defaults; progress on stderr; JSON in
bench/results/filtered_path/; the markdown report and the target checks
on stdout. Every process started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyproxy.bench.filter_bench import sanity, stage_costs
from pyproxy.bench.filter_configs import BENCH_HEADER, filter_entry, lua_header_entry
from pyproxy.bench.http_bench import (
    Processes,
    begin_run,
    finish_run,
    round_parser,
    snap_delta,
    start_nginx,
    start_pyproxy,
    start_upstream,
)
from pyproxy.bench.http_load import Path_, log
from pyproxy.bench.procs import (
    add_baseline_tree,
    baseline_tree_python,
    cell,
    git_state,
    noise_note,
    target_line,
)
from pyproxy.bench.results_folder import default_out
from pyproxy.bench.rounds import paired_ratio, run_phases

NGINX_MODULES = Path("/usr/lib/nginx/modules")  # where Debian's nginx module packages put them
NGINX_LUA = ("ndk_http_module.so", "ngx_http_lua_module.so")  # ngx_http_lua needs the NDK first
RATELIMIT_ADDED_CPU_US = 3.0
LUA_VS_NGINX_LUA = 1.5
NO_FILTER = "pyproxy"
# (target label, pyproxy path, nginx + ngx_http_lua path doing the same)
LUA_PAIRS = (
    ("Lua request-header filter", "pyproxy_lua_request", "nginx_lua_request"),
    ("Lua response-header filter", "pyproxy_lua_response", "nginx_lua_response"),
)


def start_pyproxies(
    procs: Processes, workdir: Path, upstream: int, python: Path | None = None
) -> list[tuple[Path_, tuple]]:
    """pyproxy's four configurations, each with the filter kinds it runs (for the sanity check);
    with ``python`` (--baseline-tree's), that checkout's, named before_<name>."""
    setups: tuple[tuple[str, list, tuple[str, ...], str], ...] = (
        (NO_FILTER, [], (), "default configuration, no filter"),
        ("pyproxy_ratelimit", [filter_entry("ratelimit", workdir, "pyproxy_ratelimit")],
         ("ratelimit",), "local rate limit that never limits"),
        ("pyproxy_lua_request", [lua_header_entry("request")], ("lua",),
         "Lua envoy_on_request: handle:headers():add(...)"),
        ("pyproxy_lua_response", [lua_header_entry("response")], ("lua",),
         "Lua envoy_on_response: handle:headers():add(...)"),
    )  # fmt: skip
    if python is None:
        return [
            (start_pyproxy(procs, workdir, name, upstream, filters=chain, note=note), kinds)
            for name, chain, kinds, note in setups
        ]
    return [
        (
            start_pyproxy(
                procs, workdir, f"before_{name}", upstream, filters=chain,
                python=str(python), note=f"{note}, baseline tree",
            ),
            kinds,
        )
        for name, chain, kinds, note in setups
    ]  # fmt: skip


def start_nginxes(procs: Processes, workdir: Path, upstream: int) -> tuple[list[Path_], str]:
    """nginx proxy_pass, and with ngx_http_lua when its module is installed (else why not)."""
    paths = [start_nginx(procs, workdir, upstream)]
    missing = [m for m in NGINX_LUA if not (NGINX_MODULES / m).exists()]
    if missing:
        return (
            paths,
            f"{', '.join(missing)} not in {NGINX_MODULES} (apt-get install libnginx-mod-http-lua)",
        )
    modules = "".join(f"load_module {NGINX_MODULES / m};\n" for m in NGINX_LUA)
    name, value = BENCH_HEADER
    for path, block, note in (
        ("nginx_lua_request", f'access_by_lua_block {{ ngx.req.set_header("{name}", "{value}") }}',
         "proxy_pass + access_by_lua_block: ngx.req.set_header(...)"),
        ("nginx_lua_response", f'header_filter_by_lua_block {{ ngx.header["{name}"] = "{value}" }}',
         "proxy_pass + header_filter_by_lua_block: ngx.header[...] = ..."),
    ):  # fmt: skip
        paths.append(
            start_nginx(
                procs, workdir, upstream, name=path, location=block, main=modules, note=note
            )
        )
    return paths, ""


def response_header(port: int, name: str) -> str | None:
    """The named header of one GET's response through the port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.getheader(name)
    finally:
        conn.close()


def check_response_headers(paths: list[Path_]) -> list[str]:
    """Each response-header path adds the header (both proxies do the work being compared)."""
    name, value = BENCH_HEADER
    return [
        f"{p.name}: response header {name} is {got!r}, not {value!r}"
        for p in paths
        if p.name.endswith("_lua_response") and (got := response_header(p.port, name)) != value
    ]


def targets(load: dict) -> list[dict]:
    """The issue's targets, each with the measured figure, the limit and whether it is met."""
    out = []
    if "pyproxy_ratelimit" in load:
        added = load["pyproxy_ratelimit"]["added_cpu_us_per_req"]
        out.append({
            "target": f"rate limit adds ≤ {RATELIMIT_ADDED_CPU_US:g} µs CPU/request over no filter",
            "measured": f"{added:+.1f} µs",
            "value": added, "limit": RATELIMIT_ADDED_CPU_US,
            "met": added <= RATELIMIT_ADDED_CPU_US,
        })  # fmt: skip
    for label, ours, theirs in LUA_PAIRS:
        if ours not in load or theirs not in load:
            continue
        ratio = paired_ratio(
            load[ours]["cpu_us_per_req_rounds"], load[theirs]["cpu_us_per_req_rounds"]
        )
        out.append({
            "target": f"{label} ≤ {LUA_VS_NGINX_LUA}× nginx + ngx_http_lua, CPU/request",
            "measured": f"{cell(ratio, '.2f')}× ({load[ours]['cpu_us_per_req_median']:.1f} vs "
                        f"{load[theirs]['cpu_us_per_req_median']:.1f} µs)",
            "value": ratio, "limit": LUA_VS_NGINX_LUA,
            "met": ratio is not None and ratio <= LUA_VS_NGINX_LUA,
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = round_parser(
        __doc__,
        rounds=5,
        requests=1000,
        round_seconds=1.0,
        load_rounds=5,
        seconds=4,
        out=str(default_out("filtered_path")),
    )
    add_baseline_tree(parser)
    args = parser.parse_args(argv)
    result: dict = {**begin_run(parser, args, ("nginx", "wrk", "taskset")), "skipped": {}}
    baseline_python = baseline_tree_python(parser, args)
    if baseline_python is not None:
        result["baseline_git"] = git_state(baseline_python.parents[2])
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyproxy-filtered-path-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            log("starting the upstream, pyproxy x4 and nginx (all on CPU 0)")
            upstream = start_upstream(procs, workdir)
            pyproxies = start_pyproxies(procs, workdir, upstream)
            if baseline_python is not None:
                pyproxies += start_pyproxies(procs, workdir, upstream, baseline_python)
            nginxes, why = start_nginxes(procs, workdir, upstream)
            if why:
                result["skipped"]["nginx + ngx_http_lua"] = why
            proxies = [p for p, _ in pyproxies] + nginxes
            direct = Path_("direct", upstream, note="the upstream itself: nginx return 200, 100 B")
            paths = [direct, *proxies]
            result["paths"] = {p.name: p.note for p in paths}
            problems = check_response_headers(proxies)
            snaps = {p.name: {"start": p.stats()} for p, _ in pyproxies}

            def snapshot(phase: str) -> None:
                for p, _ in pyproxies:
                    snaps[p.name][phase] = p.stats()

            run_phases(result, args, workdir, paths, latency_base="direct", load_paths=proxies,
                       connections=32, load_base=NO_FILTER, snapshot=snapshot)  # fmt: skip
        finally:
            procs.stop_all()

    result["filter_stage_us"] = {}
    for p, kinds in pyproxies:
        costs = stage_costs(snap_delta(snaps[p.name]["load"], snaps[p.name]["latency"]))
        result["filter_stage_us"][p.name] = costs["stage_us"]
        problems += sanity(p.name, kinds, costs)
    problems += [
        f"{n}: {v['errors']} wrk errors / non-2xx" for n, v in result["load"].items() if v["errors"]
    ]
    result["problems"] = problems
    result["targets"] = targets(result["load"])
    finish_run(result, args.out, started, report)
    return 1 if problems else 0


def report(result: dict) -> str:
    lat, load = result["latency"], result["load"]
    rounds = result["config"]["load_rounds"]
    lines = [
        f"| path | CPU µs/req (median of {rounds}) | added CPU µs/req vs {NO_FILTER} "
        "| added p50 µs | req/s, c32 | proxy CPU | filter stage µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in result["paths"]:
        v, t = lat[name], load.get(name)
        util = statistics.median(t["cpu_util_rounds"]) * 100 if t else None
        lines.append(
            f"| {name} | {cell(t and t['cpu_us_per_req_median'])} | "
            + (f"{t['added_cpu_us_per_req']:+.1f}" if t and "pyproxy_" in name else "—")
            + f" | {v['added_p50_us']:.1f} | {cell(t and t['rps_median'], '.0f')} | "
            f"{cell(util, '.0f')}{'%' if util else ''} | "
            f"{cell(result['filter_stage_us'].get(name), '.2f')} |"
        )
    lines.append("")
    for name, note in result["paths"].items():
        lines.append(f"* {name}: {note}")
    for name, why in result["skipped"].items():
        lines.append(f"* {name}: skipped, {why}")
    lines.append("\n" + noise_note(result["foreign_cpus"]))
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    if result["problems"]:
        lines.append("\n**Problems:**\n" + "\n".join(f"* {p}" for p in result["problems"]))
    lines.append("")
    for t in result["targets"]:
        lines.append(target_line(t["met"], t["target"], t["measured"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
