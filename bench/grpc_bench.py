"""gRPC mode benchmark: unary 100-byte calls through no proxy, pyproxy and nginx (grpc_pass).

Latency: a grpcio client, one outstanding call; targets interleave over
rounds so machine noise hits all alike; reported p50/p99 and what each proxy
adds over the direct path. Load: h2load drives 32 concurrent streams on one
connection with a prepared gRPC request body (5-byte prefix + 100 bytes).
CPU per call comes from /proc/<pid>/stat (utime+stime of the proxy's process
tree) over the load window; calls per second per proxy core = calls / proxy
CPU seconds, so the number does not depend on which process saturates first.
The proxy runs on CPU 1, everything else on CPU 0 (when there are two).
pyproxy's stage clock splits its per-call cost, and a microbenchmark prices
the gRPC framing scan alone inside `parse`.

    python -m pyproxy.bench.grpc_bench [--seconds 5] [--calls 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from time import perf_counter_ns

from pyproxy.bench import peers
from pyproxy.bench.echo_server import serve_grpc
from pyproxy.bench.procs import (
    Processes,
    cell,
    cpu_seconds,
    on_cpus,
    run_tool,
    tree_pids,
)
from pyproxy.bench.results_folder import default_out, publish

METHOD = "/bench.Echo/Unary"
PAYLOAD = b"x" * 100


def log(message: str) -> None:
    print(f"[grpc_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- processes --------------------------------------------------------------------------------


def nginx_has_grpc() -> tuple[bool, str]:
    try:
        return True, peers.nginx_grpc_check()
    except peers.Skip as exc:
        return False, str(exc)


def start_nginx(procs: Processes, workdir: Path, upstream: int, cpu) -> peers.Started:
    return peers.nginx_grpc(procs, workdir, upstream, cpu).ready()


def start_pyproxy(procs: Processes, upstream: int, cpu) -> peers.Started:
    return peers.pyproxy_flags(procs, "pyproxy", upstream, cpu, mode="grpc").ready()


def listener_stats(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json", timeout=5) as r:
        return json.loads(r.read())["listeners"]["main"]


# ---- phases -----------------------------------------------------------------------------------


def latency_phase(targets: dict[str, int], rounds: int, calls: int) -> dict:
    import grpc

    channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) for name, port in targets.items()}  # fmt: skip
    stubs = {name: ch.unary_unary(METHOD) for name, ch in channels.items()}
    samples: dict[str, list[int]] = {name: [] for name in targets}
    for stub in stubs.values():
        for _ in range(300):  # warm: connections, pools, caches
            stub(PAYLOAD, timeout=5)
    for r in range(rounds):
        for name, stub in stubs.items():
            out = samples[name]
            for _ in range(calls):
                t0 = perf_counter_ns()
                stub(PAYLOAD, timeout=5)
                out.append(perf_counter_ns() - t0)
        log(f"latency round {r + 1}/{rounds} done")
    for ch in channels.values():
        ch.close()
    return percentiles(samples)


def percentiles(samples: dict[str, list[int]]) -> dict:
    """p50/p99 per target (ns samples), and what each adds over the "direct" one."""
    result = {}
    for name, values in samples.items():
        values.sort()
        result[name] = {
            "p50_us": values[len(values) // 2] / 1000,
            "p99_us": values[int(len(values) * 0.99)] / 1000,
            "calls": len(values),
        }
    base = result["direct"]
    for v in result.values():
        v["added_p50_us"] = v["p50_us"] - base["p50_us"]
        v["added_p99_us"] = v["p99_us"] - base["p99_us"]
    return result


def run_h2load(port: int, body: Path, seconds: int, cpu) -> dict:
    argv = ["h2load", "-c1", "-m32", "-D", str(seconds), "--warm-up-time=1", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{port}{METHOD}"]  # fmt: skip
    out = run_tool(argv, cpu, timeout=seconds + 30)
    text = out.stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    statuses = re.search(r"status codes: (\d+) 2xx", text)
    return {
        "done": int(done.group(1)) if done else 0,
        "succeeded": int(done.group(2)) if done else 0,
        "status_2xx": int(statuses.group(1)) if statuses else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
    }


def load_phase(
    targets: dict[str, int], pids: dict[str, list[int]], body: Path, seconds: int, cpu
) -> dict:
    result = {}
    for name, port in targets.items():
        proxy_pids = pids.get(name, [])
        before = cpu_seconds(proxy_pids)
        t0 = time.monotonic()
        run = run_h2load(port, body, seconds, cpu)
        wall = time.monotonic() - t0
        used = cpu_seconds(proxy_pids) - before
        calls = run["succeeded"]
        entry = {"calls_per_s": run["rps"], "calls": calls, "status_2xx": run["status_2xx"]}
        if proxy_pids and calls:
            # h2load's warm-up second is not in `calls` but is in the CPU window: count it in.
            window_calls = calls * (wall / seconds) if wall > seconds else calls
            entry["proxy_cpu_s"] = used
            entry["proxy_cpu_util"] = used / wall
            entry["cpu_us_per_call"] = used / window_calls * 1e6
            entry["calls_per_s_per_core"] = window_calls / used if used else None
        result[name] = entry
        log(f"load {name}: {run['rps']:.0f} calls/s")
    return result


def stage_delta(after: dict, before: dict, calls: int) -> dict:
    out = {}
    for stage, values in after["stages"].items():
        ns = values["ns"] - before["stages"][stage]["ns"]
        if ns:
            out[stage] = round(ns / calls / 1000, 2)
    out["total"] = round(sum(out.values()), 2)
    return out


def framing_cost_us() -> float:
    """The gRPC part of `parse`: one MessageScanner.feed per direction per unary call."""
    from pyproxy.codec.grpc import MessageScanner, frame

    chunk = frame(PAYLOAD)
    rounds = 200_000
    scanner = MessageScanner()
    t0 = perf_counter_ns()
    for _ in range(rounds):
        scanner.feed(chunk)
    return (perf_counter_ns() - t0) / rounds / 1000 * 2


def h2_codec_cost_us(calls: int = 3000, proxy_conn=None) -> float:
    """The codec's share of `parse`: the proxy's two HTTP/2 connections handling one unary call,
    peers simulated in-process and not timed (headers and trailers as a grpcio peer sends them).
    The proxy's connections are hyper-h2's unless `proxy_conn(client_side)` makes them."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, RequestReceived

    def conn(client: bool) -> H2Connection:
        c = H2Connection(H2Configuration(client_side=client, header_encoding=None))
        c.initiate_connection()
        return c

    make = proxy_conn or conn

    def peer_receive(peer: H2Connection, wire: bytes) -> None:
        for event in peer.receive_data(wire):
            if isinstance(event, DataReceived):
                peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    client, down, up, server = conn(True), make(False), make(True), conn(False)
    down.receive_data(client.data_to_send())
    client.receive_data(down.data_to_send())
    server.receive_data(up.data_to_send())
    up.receive_data(server.data_to_send())
    down.receive_data(client.data_to_send())
    server.receive_data(up.data_to_send())
    body = b"\0" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD
    request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD.encode()),
               (b":authority", b"127.0.0.1"), (b"te", b"trailers"),
               (b"content-type", b"application/grpc"), (b"user-agent", b"grpc-python/1.85")]  # fmt: skip
    response = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]
    spent = 0
    for _ in range(calls):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, request)
        client.send_data(sid, body, end_stream=True)
        wire = client.data_to_send()
        t0 = perf_counter_ns()
        head = down.receive_data(wire)[0]
        assert isinstance(head, RequestReceived)
        usid = up.get_next_available_stream_id()
        up.send_headers(usid, head.headers)
        up.send_data(usid, body, end_stream=True)
        down.acknowledge_received_data(len(body), sid)
        out_up, out_down = up.data_to_send(), down.data_to_send()
        spent += perf_counter_ns() - t0
        peer_receive(client, out_down)
        peer_receive(server, out_up)
        server.send_headers(usid, response)
        server.send_data(usid, body)
        server.send_headers(usid, trailers, end_stream=True)
        wire = server.data_to_send()
        t0 = perf_counter_ns()
        up.receive_data(wire)
        down.send_headers(sid, response)
        down.send_data(sid, body)
        down.send_headers(sid, trailers, end_stream=True)
        up.acknowledge_received_data(len(body), usid)
        out_up, out_down = up.data_to_send(), down.data_to_send()
        spent += perf_counter_ns() - t0
        peer_receive(server, out_up)
        peer_receive(client, out_down)
        # The peers' WINDOW_UPDATEs come back: handling them is the proxy's work too.
        wire_down, wire_up = client.data_to_send(), server.data_to_send()
        t0 = perf_counter_ns()
        down.receive_data(wire_down)
        up.receive_data(wire_up)
        spent += perf_counter_ns() - t0
    return round(spent / calls / 1000, 1)


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="h2load duration per target")
    parser.add_argument(
        "--calls", type=int, default=2000, help="latency calls per target per round"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(default_out("grpc_bench")), help="results folder")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_grpc(args.serve)
        return 0
    if not shutil.which("h2load"):
        print("h2load missing: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    two_cpus = (os.cpu_count() or 1) >= 2
    proxy_cpu, rest_cpu = (1, 0) if two_cpus else (None, None)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="grpc_bench-"))
    result: dict = {"host": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    with on_cpus(rest_cpu):  # the client and the app on the other CPU
        try:
            app_peer = peers.grpc_app(procs, rest_cpu).ready()
            app = app_peer.port
            targets = {"direct": app}
            pids: dict[str, list[int]] = {}
            py = start_pyproxy(procs, app, proxy_cpu)
            targets["pyproxy"], admin = py.port, py.admin
            ok, why = nginx_has_grpc()
            result["nginx"] = why
            if ok:
                nginx = start_nginx(procs, workdir, app, proxy_cpu)
                pids["nginx"] = tree_pids(nginx.pid)
                targets["nginx"] = nginx.port
            else:
                log(f"nginx skipped: {why}")
            time.sleep(0.5)  # workers forked
            pids["pyproxy"] = tree_pids(py.pid)
            pids["app"] = [app_peer.pid]
            log(f"targets: {targets}")

            before = listener_stats(admin)
            result["latency"] = latency_phase(targets, args.rounds, args.calls)
            after = listener_stats(admin)
            calls = after["requests"] - before["requests"]
            result["stages_serial_us_per_call"] = stage_delta(after, before, calls)

            body = workdir / "body.bin"
            body.write_bytes(b"\0" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD)
            before = listener_stats(admin)
            result["load"] = load_phase(targets, pids, body, args.seconds, rest_cpu)
            after = listener_stats(admin)
            calls = after["requests"] - before["requests"]
            result["stages_load_us_per_call"] = stage_delta(after, before, calls)
            grpc_stats = after.get("grpc", {})
            result["grpc_statuses"] = {
                m: v["statuses"] for m, v in grpc_stats.get("methods", {}).items()
            }
            result["grpc_framing_us_per_call"] = round(framing_cost_us(), 3)
            result["h2_codec_us_per_call"] = h2_codec_cost_us()
        finally:
            procs.stop_all()
            shutil.rmtree(workdir, ignore_errors=True)
    publish(args.out, result, report(result), args)
    return 0


def report(result: dict) -> str:
    lines = [
        "| unary, 100 B | p50 µs | p99 µs | added p50 µs | added p99 µs | calls/s (32 streams) | proxy CPU µs/call | calls/s per proxy core |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    for name, lat in result["latency"].items():
        load = result["load"].get(name, {})
        direct = name == "direct"
        cells = [
            name,
            cell(lat["p50_us"], ".0f"),
            cell(lat["p99_us"], ".0f"),
            cell(None if direct else lat["added_p50_us"], ".0f"),
            cell(None if direct else lat["added_p99_us"], ".0f"),
            cell(load.get("calls_per_s"), ".0f"),
            cell(load.get("cpu_us_per_call"), ".0f"),
            cell(load.get("calls_per_s_per_core"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    serial, loaded = result["stages_serial_us_per_call"], result["stages_load_us_per_call"]
    lines += [
        "",
        "| pyproxy stage | µs/call, serial | µs/call, 32 streams |",
        "| --- | ---: | ---: |",
    ]
    for stage in serial:
        lines.append(f"| {stage} | {serial[stage]:.1f} | {loaded.get(stage, 0):.1f} |")
    lines.append(
        f"\ngRPC framing scan alone (both directions): {result['grpc_framing_us_per_call']:.2f} µs/call; "
        f"statuses seen: {result['grpc_statuses']}"
    )
    lines.append(
        f"hyper-h2 alone, the proxy's two connections for one unary call (in-process, no I/O): "
        f"{result['h2_codec_us_per_call']:.0f} µs/call"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
