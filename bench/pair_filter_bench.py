"""Header-only filters on the native pair: CPU per request beside nginx (issue 19's targets).

Each configuration is one proxy in front of the same upstream (nginx answering
`return 200` with a 100-byte body, on CPU 0), loaded by `wrk -t1 -c32` (on
CPU 0) while the proxy runs alone on CPU 1; CPU per request is the utime+stime
of the proxy's processes over its wrk runs divided by the requests wrk
completed. Rounds interleave the configurations in shuffled order so machine
noise hits all alike.

* pyproxy (this checkout; with `--baseline-python`, also the checkout whose
  interpreter that is, e.g. main's venv, in the same run): no filter; a local
  rate limit that never limits (one bucket of 10^9 tokens); a one-line Lua
  filter adding a request header; a one-line Lua filter adding a response
  header. Default HTTP settings (fast codec, native express lane).
* nginx `proxy_pass` (keepalive upstream), and nginx with `ngx_http_lua`
  (Debian's libnginx-mod-http-lua) adding the same request header
  (`rewrite_by_lua_block`) or response header (`header_filter_by_lua_block`).

Targets: the rate limit adds at most 3 µs CPU per request to the no-filter
figure; each Lua header filter costs at most 1.5x nginx + ngx_http_lua doing
the same. JSON in bench/results/pair_filter_bench.json, a markdown table on
stdout, progress on stderr; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from pyproxy.bench.http_bench import (
    SIDE_CPU,
    Path_,
    Processes,
    git_state,
    log,
    nginx_conf,
    start_pyproxy,
    start_upstream,
    throughput_phase,
    wait_http,
)
from pyproxy.bench.procs import free_port, pinned

RESULTS = Path(__file__).resolve().parent / "results"
LUA_MODULES = "/usr/lib/nginx/modules"

FILTERS = {
    "none": "",
    "ratelimit": (
        "    filters:\n      - name: rl\n        type: ratelimit\n        config:\n"
        "          token_bucket: {max_tokens: 1000000000, tokens_per_fill: 1000000000,"
        " fill_interval: 1s}\n"
    ),
    "lua_request": (
        "    filters:\n      - name: lua\n        type: lua\n        config:\n"
        "          inline_code: \"function envoy_on_request(h) h:headers():add('x-lua', '1') end\"\n"
    ),
    "lua_response": (
        "    filters:\n      - name: lua\n        type: lua\n        config:\n"
        "          inline_code: \"function envoy_on_response(h) h:headers():add('x-lua', '1') end\"\n"
    ),
}

NGINX_LOCATIONS = {
    "nginx": "",
    "nginx_lua_request": "rewrite_by_lua_block { ngx.req.set_header('x-lua', '1') }",
    "nginx_lua_response": "header_filter_by_lua_block { ngx.header['x-lua'] = '1' }",
}


def start_nginx_variant(procs: Processes, workdir: Path, name: str, upstream: int) -> Path_:
    port = free_port()
    lua = NGINX_LOCATIONS[name]
    main = (
        f"load_module {LUA_MODULES}/ndk_http_module.so;\n"
        f"load_module {LUA_MODULES}/ngx_http_lua_module.so;\n"
        if lua
        else ""
    )
    conf = nginx_conf(
        workdir, name,
        f"upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}\n"
        f"server {{ listen 127.0.0.1:{port};\n"
        f"  location / {{ {lua} proxy_pass http://app; proxy_http_version 1.1;"
        ' proxy_set_header Connection ""; } }\n',
        main=main,
    )  # fmt: skip
    proc = procs.launch(name, pinned(SIDE_CPU, ["nginx", "-c", str(conf), "-p", str(workdir)]))
    wait_http(port)
    return Path_(name, port, proc.pid, note=lua or "proxy_pass, keepalive 64 upstream")


def start_paths(procs: Processes, workdir: Path, upstream: int, pythons: dict) -> list[Path_]:
    paths = []
    for checkout, python in pythons.items():
        for kind, extra in FILTERS.items():
            name = f"{checkout}:{kind}"
            path = start_pyproxy(
                procs, workdir, name.replace(":", "_"), upstream, "fast", True,
                listener_extra=extra, python=python,
            )  # fmt: skip
            path.name = name
            paths.append(path)
    for name in NGINX_LOCATIONS:
        paths.append(start_nginx_variant(procs, workdir, name, upstream))
    return paths


def load(paths: list[Path_], workdir: Path, rounds: int, seconds: int) -> dict:
    out = throughput_phase(paths, workdir, rounds, seconds)  # wrk -t1 -c32, shuffled rounds
    for p in paths:
        if p.admin is not None:  # how much of it the C pair carried (filters included)
            stats = p.stats()["listeners"]["main"]
            out[p.name]["native_share"] = round(stats["native_requests"] / stats["requests"], 3)
    return out


def targets(cpu: dict, checkout: str) -> dict:
    def us(name: str) -> float:
        return cpu[name]["proxy_cpu_us_per_req"]

    base = us(f"{checkout}:none")
    return {
        "ratelimit_added_us": round(us(f"{checkout}:ratelimit") - base, 2),
        "ratelimit_met": us(f"{checkout}:ratelimit") - base <= 3.0,
        "lua_request_vs_nginx": round(us(f"{checkout}:lua_request") / us("nginx_lua_request"), 2),
        "lua_request_met": us(f"{checkout}:lua_request") <= 1.5 * us("nginx_lua_request"),
        "lua_response_vs_nginx": round(
            us(f"{checkout}:lua_response") / us("nginx_lua_response"), 2
        ),
        "lua_response_met": us(f"{checkout}:lua_response") <= 1.5 * us("nginx_lua_response"),
    }


def report(result: dict) -> str:
    cpu = result["cpu"]
    lines = [
        "| path | CPU µs/request | req/s (best) | errors | share carried by the C pair |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in cpu.items():
        us, share = row["proxy_cpu_us_per_req"], row.get("native_share", "")
        lines.append(f"| {name} | {us:.2f} | {row['rps']:.0f} | {row['errors']} | {share} |")
    for checkout, met in result["targets"].items():
        lines.append(f"\n{checkout}: {json.dumps(met)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="wrk runs per configuration")
    parser.add_argument("--seconds", type=int, default=3, help="wrk duration")
    parser.add_argument("--baseline-python", help="another checkout's interpreter, same run")
    parser.add_argument("--out", default=str(RESULTS / "pair_filter_bench.json"))
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool):
            parser.error(f"{tool} is needed")
    if not Path(LUA_MODULES, "ngx_http_lua_module.so").exists():
        parser.error("ngx_http_lua is needed (Debian: libnginx-mod-http-lua)")
    pythons = {"this": sys.executable}
    if args.baseline_python:
        pythons["baseline"] = args.baseline_python
    # SIGTERM/SIGHUP unwind through the finally below, so nothing is left running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="pair-filter-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes()
        try:
            upstream = start_upstream(procs, workdir)
            paths = start_paths(procs, workdir, upstream, pythons)
            log(f"{len(paths)} configurations, {args.rounds} rounds of {args.seconds}s")
            cpu = load(paths, workdir, args.rounds, args.seconds)
        finally:
            procs.stop_all()
    result = {
        "git": git_state(),
        "pythons": pythons,
        "cpu": cpu,
        "targets": {checkout: targets(cpu, checkout) for checkout in pythons},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
