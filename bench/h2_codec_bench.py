"""HTTP/2 codec benchmark: pyproxy on hyper-h2 and on libnghttp2 beside nginx and haproxy.

One run, the same upstreams for every path, each proxy on CPU 1 while it is loaded (load
generators and upstreams on CPU 0):

* gRPC unary, 100 B: a grpcio server; pyproxy (mode grpc, `http2_codec: h2` and `native`),
  nginx `grpc_pass`, haproxy (`proto h2` both sides). Latency: a grpcio client, one call
  outstanding, targets interleaved over rounds (grpc_bench's phase), added p50/p99 over the
  direct path. Load: h2load -c1 -m32 with a gRPC-framed body; proxy CPU per call from
  /proc/<pid>/stat; calls per proxy CPU-second.
* HTTP/2 GET, 100 B: an nginx `return 200` upstream over HTTP/1.1; pyproxy (mode http, h2c
  prior knowledge), nginx `listen ... http2`, haproxy `proto h2`. Latency: one h2c connection,
  one request outstanding; load: h2load -c32 -m10 (http_bench's phase), CPU per request, RSS.
* pyproxy's stage table (per call, from /stats deltas over the gRPC load) for both codecs.
* Both phases also run pyproxy on the native codec with its lane on (`pyproxy-native-lane`:
  `http2_lane: true`, plain GETs carried to the HTTP/1.1 upstream in C; `grpc_lane: true`,
  the default, unary-shaped gRPC calls carried to the h2c upstream in C), interleaved with the
  others, and pair its CPU per request with `pyproxy-native`'s (the lane off) round by round;
  the gRPC rows also say what share of the calls the lane finished in C.

The machine may be shared: every figure is from this one run, written to
bench/results/h2_codec_bench/.

With --baseline-tree PATH (another checkout, built), that checkout's pyproxy on the native codec
runs beside this one as `before_pyproxy-native`, through every phase of the same run; the load
phases then go in interleaved rounds (--load-rounds), each figure the median over rounds and the
before/after ratios paired within a round.

    python -m pyproxy.bench.h2_codec_bench [--seconds 5] [--calls 1000] [--rounds 2]
        [--baseline-tree PATH] [--load-rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter_ns

from pyproxy.bench import grpc_bench, http_bench, peers
from pyproxy.bench.driver import Http2Exchanger
from pyproxy.bench.http_load import LOAD_CPU, SIDE_CPU, Path_, log, wait_http
from pyproxy.bench.procs import cell, get_json, move_to_cpu, on_cpus
from pyproxy.bench.results_folder import default_out, publish
from pyproxy.bench.rounds import interleaved, paired_ratio

CODECS = ("h2", "native")
BEFORE = "before_pyproxy-native"  # --baseline-tree's pyproxy, native codec
LANE = "pyproxy-native-lane"  # the native codec with its lane on (HTTP/2 or gRPC)
BEFORE_LANE = "before_pyproxy-native-lane"  # --baseline-tree's pyproxy, its lane on


def _knows(python: Path, setting: str) -> bool:
    """Whether the checkout whose venv holds `python` has the setting (a lane's switch)."""
    config = python.parent.parent.parent / "pyproxy" / "config.py"  # <tree>/.venv/bin/python
    return config.is_file() and f'"{setting}"' in config.read_text()


def start_pyproxy(
    procs: http_bench.Processes, name: str, mode: str, upstream: int, codec: str,
    python: Path | None = None, lane: bool = False,
):  # fmt: skip
    interpreter = str(python) if python is not None else sys.executable
    switch = "grpc_lane" if mode == "grpc" else "http2_lane"
    http: dict = {"http2_codec": codec, switch: lane}
    if python is not None and not _knows(python, switch):
        del http[switch]  # a tree from before the lane: its native codec has none
    listener = {"mode": mode, "upstream": f"127.0.0.1:{upstream}", "http": http}
    started = peers.pyproxy_config(procs, procs.logs, name, listener, SIDE_CPU, python=interpreter)
    port, admin = started.ready().port, started.admin
    info = get_json(f"http://127.0.0.1:{admin}/server_info")
    assert info["http2_codec"] == {"main": codec}, info["http2_codec"]
    if mode == "grpc" and python is None:  # the lane is on where asked, and only there
        assert info["grpc_lane"] == {"main": lane and codec == "native"}, info["grpc_lane"]
    note = f"http2_codec: {codec}" + (", baseline tree" if python is not None else "")
    note += f", {switch}: true" if lane else ""
    return Path_(name, port, started.pid, admin=admin, note=note, h2_port=port)


def start_pyproxies(procs: http_bench.Processes, mode: str, upstream: int, args) -> list[Path_]:
    """pyproxy on each codec and on the native one with its lane, and the baseline tree's on
    the native one, with and without its lane, when given."""
    paths = [start_pyproxy(procs, f"pyproxy-{c}", mode, upstream, c) for c in CODECS]
    paths.append(start_pyproxy(procs, LANE, mode, upstream, "native", lane=True))
    python = args.baseline_python
    if python is not None:
        paths.append(start_pyproxy(procs, BEFORE, mode, upstream, "native", python))
        if _knows(python, "grpc_lane" if mode == "grpc" else "http2_lane"):
            paths.append(start_pyproxy(procs, BEFORE_LANE, mode, upstream, "native", python, True))
    return paths


def load_rounds(paths: list[Path_], rounds: int, run_one) -> dict:
    """``run_one(path)`` for every path in interleaved rounds: per path the round with the
    median CPU per request (its figures), plus every round's CPU per request."""
    runs: dict[str, list[dict]] = {p.name: [] for p in paths}
    for p in interleaved(paths, rounds, 11, "load"):
        runs[p.name].append(run_one(p))
    out = {}
    for name, values in runs.items():
        cpu = [_cpu_us(v) for v in values]
        known = sorted((c, i) for i, c in enumerate(cpu) if c is not None)
        entry = dict(values[known[len(known) // 2][1]]) if known else dict(values[0])
        entry["cpu_us_rounds"] = cpu
        out[name] = entry
    return out


def _cpu_us(entry: dict) -> float | None:
    return entry.get("cpu_us_per_call", entry.get("proxy_cpu_us_per_req"))


def start_haproxy(procs: http_bench.Processes, upstream: int, grpc: bool) -> Path_:
    name = "haproxy-grpc" if grpc else "haproxy-h2"
    started = peers.haproxy(procs, procs.logs, upstream, SIDE_CPU, name=name, front="h2",
                            back_h2=grpc).ready()  # fmt: skip
    return Path_(name, started.port, started.pid, note="nbthread 1", h2_port=started.port)


# ---- HTTP/2 GET ----------------------------------------------------------------------------


class _H2Get(Http2Exchanger):
    """One h2c connection that times GETs one at a time (the driver's HTTP/2 client; any 200)."""

    def __init__(self, port: int) -> None:
        super().__init__(f"127.0.0.1:{port}", 0)

    def request_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"b"),
            (b":path", b"/"),
        ]

    def check(self, status: bytes | None, body_bytes: int) -> None:
        if status != b"200":
            raise RuntimeError(f"unexpected status {status!r}")

    get = Http2Exchanger.exchange


def get_latency(targets: dict[str, int], rounds: int, calls: int) -> dict:
    clients = {name: _H2Get(port) for name, port in targets.items()}
    samples: dict[str, list[int]] = {name: [] for name in targets}
    for client in clients.values():
        for _ in range(200):
            client.get()
    for _ in range(rounds):
        for name, client in clients.items():
            out = samples[name]
            for _ in range(calls):
                t0 = perf_counter_ns()
                client.get()
                out.append(perf_counter_ns() - t0)
    for client in clients.values():
        client.close()
    return grpc_bench.percentiles(samples)


def start_upstream(procs: http_bench.Processes, workdir: Path) -> tuple[int, int]:
    """nginx answering 100 B: HTTP/1.1 for the proxies, h2c for the direct latency base."""
    started = peers.nginx_return_200(procs, workdir, SIDE_CPU)
    wait_http(started.port)
    return started.port, started.h2_port


def http2_get(workdir: Path, args) -> dict:
    procs = http_bench.Processes(workdir)
    try:
        upstream, direct = start_upstream(procs, workdir)
        paths = start_pyproxies(procs, "http", upstream, args)
        paths.append(http_bench.start_nginx(procs, workdir, upstream))
        paths.append(start_haproxy(procs, upstream, grpc=False))
        time.sleep(0.5)
        targets = {"direct": direct} | {p.name: p.h2_port for p in paths}
        latency = get_latency(targets, args.rounds, args.calls)

        def one(p: Path_) -> dict:
            log(f"h2load -c32 -m10 via {p.name}")
            return http_bench.under_load(p, lambda: http_bench.run_h2load(p, args.seconds))

        return {"latency": latency, "load": load_rounds(paths, args.load_rounds, one)}
    finally:
        procs.stop_all()


# ---- gRPC unary ------------------------------------------------------------------------------


def grpc_unary(workdir: Path, args) -> dict:
    procs = http_bench.Processes(workdir)
    try:
        app = peers.grpc_app(procs, SIDE_CPU).ready().port
        paths = start_pyproxies(procs, "grpc", app, args)
        ok, why = grpc_bench.nginx_has_grpc()
        if ok:
            nginx = grpc_bench.start_nginx(procs, workdir, app, SIDE_CPU)
            paths.append(
                Path_("nginx", nginx.port, nginx.pid, note="grpc_pass", h2_port=nginx.port)
            )
        else:
            log(f"nginx skipped: {why}")
        paths.append(start_haproxy(procs, app, grpc=True))
        time.sleep(0.5)
        targets = {"direct": app} | {p.name: p.port for p in paths}
        latency = grpc_bench.latency_phase(targets, args.rounds, args.calls)
        body = workdir / "grpc-body.bin"
        payload = grpc_bench.PAYLOAD
        body.write_bytes(b"\0" + len(payload).to_bytes(4, "big") + payload)
        stages: dict[str, dict] = {}

        def one(p: Path_) -> dict:
            before = p.stats()["listeners"]["main"] if p.admin else None
            grpc_bench.log(f"h2load gRPC via {p.name}")
            move_to_cpu(p.pids(), LOAD_CPU)
            entry = grpc_bench.load_phase(
                {p.name: p.port}, {p.name: p.pids()}, body, args.seconds, SIDE_CPU
            )[p.name]
            entry["rss_mib"] = http_bench.rss_mib(p.pids())
            move_to_cpu(p.pids(), SIDE_CPU)
            if before is not None:  # the last round's stage table
                after = p.stats()["listeners"]["main"]
                calls = after["requests"] - before["requests"]
                stages[p.name] = grpc_bench.stage_delta(after, before, calls)
                native = after["native_requests"] - before["native_requests"]
                entry["lane_share"] = round(native / calls, 4) if calls else None
            return entry

        load = load_rounds(paths, args.load_rounds, one)
        return {"latency": latency, "load": load, "stages_us_per_call": stages}
    finally:
        procs.stop_all()


def codec_alone() -> dict:
    """Each codec alone, in process: the proxy's two connections for one unary call (µs)."""
    from pyproxy.codec import http2_native

    def native(client: bool) -> http2_native.NativeH2Connection:
        conn = http2_native.NativeH2Connection(client, 1000)
        conn.initiate({http2_native.INITIAL_WINDOW_SIZE: 65535}, 1 << 20)
        return conn

    return {
        "h2": grpc_bench.h2_codec_cost_us(),
        "native": grpc_bench.h2_codec_cost_us(proxy_conn=native),
    }


# ---- report ------------------------------------------------------------------------------------


def targets_met(result: dict) -> dict:
    """The issue's targets, each with the ratio measured in this run."""
    g, h = result["grpc"], result["http2_get"]

    def per_cpu_s(load: dict, name: str, key: str) -> float | None:
        entry = load.get(name, {})
        us = entry.get(key)
        return 1e6 / us if us else None

    out: dict = {}
    for kind, load, key in (("grpc", g["load"], "cpu_us_per_call"),
                            ("http2_get", h["load"], "proxy_cpu_us_per_req")):  # fmt: skip
        native, h2 = per_cpu_s(load, "pyproxy-native", key), per_cpu_s(load, "pyproxy-h2", key)
        if native and h2:
            out[f"{kind}: native (lane off) / h2 req per CPU-s (target >= 5)"] = round(
                native / h2, 2
            )
    lane_g, h2_g = (per_cpu_s(g["load"], n, "cpu_us_per_call") for n in (LANE, "pyproxy-h2"))
    if lane_g and h2_g:  # the gRPC lane is on by default: what a user's unary call costs
        out["grpc: native with the lane / h2 calls per CPU-s (target >= 5)"] = round(
            lane_g / h2_g, 2
        )
    lane_s, h2_s = (per_cpu_s(h["load"], n, "proxy_cpu_us_per_req") for n in (LANE, "pyproxy-h2"))
    if lane_s and h2_s:  # the lane is on by default, so this is what a user's HTTP/2 GET costs
        out["http2_get: native with the lane / h2 req per CPU-s (target >= 5)"] = round(
            lane_s / h2_s, 2
        )
    nginx = g["latency"].get("nginx")
    for name in (LANE, "pyproxy-native"):
        if not nginx or name not in g["load"]:
            continue
        out[f"grpc: {name} added p50 / nginx grpc_pass (target <= 1.5)"] = round(
            g["latency"][name]["added_p50_us"] / nginx["added_p50_us"], 2
        )
        cpu_n = g["load"]["nginx"].get("cpu_us_per_call")
        if cpu_n:
            out[f"grpc: {name} CPU per call / nginx (target <= 2)"] = round(
                g["load"][name]["cpu_us_per_call"] / cpu_n, 2
            )
    haproxy = per_cpu_s(h["load"], "haproxy-h2", "proxy_cpu_us_per_req")
    for name in ("pyproxy-native", LANE):
        mine = per_cpu_s(h["load"], name, "proxy_cpu_us_per_req")
        if mine and haproxy:
            out[f"http2_get: {name} / haproxy req per CPU-s (target >= 0.5)"] = round(
                mine / haproxy, 2
            )
    for kind, part in (("grpc", g), ("http2_get", h)):
        lane, native = part["load"].get(LANE), part["load"].get("pyproxy-native")
        if lane and native:
            ratio = paired_ratio(lane["cpu_us_rounds"], native["cpu_us_rounds"])
            if ratio is not None:
                out[f"{kind}: CPU per request, lane on / off (paired)"] = round(ratio, 3)
    for kind, part in (("grpc", g), ("http2_get", h)):
        lat = part["latency"]
        for ours, theirs, what in (("pyproxy-native", BEFORE, "native"),
                                   (LANE, BEFORE_LANE, "native with the lane")):  # fmt: skip
            before = part["load"].get(theirs)
            if before is None:
                continue
            ratio = paired_ratio(part["load"][ours]["cpu_us_rounds"], before["cpu_us_rounds"])
            if ratio is not None:
                out[f"{kind}: {what} CPU per request, this tree / baseline tree (paired)"] = round(
                    ratio, 3
                )
            out[f"{kind}: {what} added p50 µs, this tree / baseline tree"] = (
                f"{lat[ours]['added_p50_us']:.0f} / {lat[theirs]['added_p50_us']:.0f}"
            )
    return out


def report(result: dict) -> str:
    g, h = result["grpc"], result["http2_get"]
    lines = [
        "| gRPC unary 100 B | added p50 µs | added p99 µs | calls/s (h2load -c1 -m32) "
        "| proxy CPU µs/call | calls per CPU-s | RSS MiB | finished in C |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, load in g["load"].items():
        lat = g["latency"][name]
        lines.append(
            f"| {name} | {cell(lat['added_p50_us'], '.0f')} | {cell(lat['added_p99_us'], '.0f')} "
            f"| {cell(load.get('calls_per_s'), '.0f')} | {cell(load.get('cpu_us_per_call'), '.1f')} "
            f"| {cell(load.get('calls_per_s_per_core'), '.0f')} | {cell(load.get('rss_mib'), '.1f')} "
            f"| {cell(load.get('lane_share'), '.1%')} |"
        )
    lines += [
        "",
        "| HTTP/2 GET 100 B | added p50 µs | added p99 µs | req/s (h2load -c32 -m10) "
        "| proxy CPU µs/req | req per CPU-s | RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, load in h["load"].items():
        lat = h["latency"][name]
        us = load.get("proxy_cpu_us_per_req")
        lines.append(
            f"| {name} | {cell(lat['added_p50_us'], '.0f')} | {cell(lat['added_p99_us'], '.0f')} "
            f"| {cell(load.get('rps'), '.0f')} | {cell(us, '.1f')} | {cell(1e6 / us if us else None, '.0f')} "
            f"| {cell(load.get('rss_mib'), '.1f')} |"
        )
    stages = g["stages_us_per_call"]
    names = [s for s in stages.get("pyproxy-h2", {}) if s != "total"] + ["total"]
    lines += ["", "| pyproxy stage, µs per gRPC call under load | " + " | ".join(stages) + " |",
              "| --- |" + " ---: |" * len(stages)]  # fmt: skip
    for stage in names:
        cells = " | ".join(cell(stages[c].get(stage), ".1f") for c in stages)
        lines.append(f"| {stage} | {cells} |")
    alone = result["codec_alone_us_per_call"]
    lines.append(
        f"\nThe codec alone, the proxy's two connections per unary call (in process, no I/O): "
        f"hyper-h2 {alone['h2']:.0f} µs, native {alone['native']:.0f} µs "
        f"({alone['h2'] / alone['native']:.1f}×)."
    )
    lines += ["", "| target | measured |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in result["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="h2load duration per path")
    parser.add_argument("--calls", type=int, default=1000, help="latency calls per path and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load-rounds", type=int, default=1, help="interleaved load rounds")
    parser.add_argument("--out", default=str(default_out("h2_codec_bench")), help="results folder")
    http_bench.add_baseline_tree(parser)
    args = parser.parse_args(argv)
    args.baseline_python = http_bench.baseline_tree_python(parser, args)
    for tool in ("h2load", "nginx", "haproxy", "taskset"):
        if not shutil.which(tool):
            print(f"{tool} missing: make system-deps-bench", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("needs two CPUs (the proxy alone on CPU 1 under load)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="h2_codec_bench-"))
    result: dict = {"host": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    try:
        with on_cpus(SIDE_CPU):
            result["grpc"] = grpc_unary(workdir, args)
            result["http2_get"] = http2_get(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["codec_alone_us_per_call"] = codec_alone()
    result["targets"] = targets_met(result)
    publish(args.out, result, report(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
