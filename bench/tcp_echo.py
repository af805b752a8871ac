"""TCP mode benchmark: added echo latency (pyproxy vs nginx stream vs no proxy) and bulk throughput.

Latency: 100-byte messages at one outstanding message; every process pinned
to one CPU so no configuration wins by spreading work; rounds interleave the
targets so machine noise hits all of them alike. Reported: p50/p99 round trip,
added latency over the direct path, pyproxy's ratio to nginx, the stage clock's
own cost (clock on vs off) and pyproxy's stage breakdown.
Throughput: iperf3 through each proxy (proxy on its own CPU, iperf3 on the other).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pyproxy.bench.echo_client import measure_rtts, summarize
from pyproxy.bench.procs import Processes, free_port, pinned, wait_port

from pyproxy.stats import stage_table

RESULTS = Path(__file__).resolve().parent / "results"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def start_nginx(
    procs: Processes, workdir: Path, listen: int, upstream: int, cpu: int | None
) -> bool:
    if not (shutil.which("nginx") and os.path.exists(NGINX_STREAM_MODULE)):
        return False
    conf = workdir / f"nginx-{listen}.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        f"daemon off; master_process off; worker_processes 1; pid {workdir}/nginx-{listen}.pid;\n"
        f"error_log {workdir}/nginx-{listen}.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"stream {{ server {{ listen 127.0.0.1:{listen}; proxy_pass 127.0.0.1:{upstream}; tcp_nodelay on; }} }}\n"
    )
    procs.start(
        pinned(
            cpu,
            ["nginx", "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "nginx-error.log")],
        )
    )
    wait_port(listen)
    return True


def start_pyproxy(
    procs: Processes, listen: int, upstream: int, admin: int, cpu: int | None, *extra: str
) -> None:
    argv = [sys.executable, "-m", "pyproxy", "run", "--listen", f"127.0.0.1:{listen}", "--upstream", f"127.0.0.1:{upstream}",
            "--admin", f"127.0.0.1:{admin}", "--log-level", "warning", *extra]  # fmt: skip
    procs.start(pinned(cpu, argv))
    wait_port(admin)
    wait_port(listen)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def latency(targets: dict[str, int], rounds: int, per_round: int) -> dict[str, dict]:
    samples: dict[str, list[int]] = {name: [] for name in targets}
    order = list(targets)
    rng = random.Random(7)
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name] += measure_rtts(f"127.0.0.1:{targets[name]}", per_round, warmup=100)
        print(f"  latency round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {name: summarize(values) for name, values in samples.items()}


def iperf3(port: int, seconds: int) -> float | None:
    """Gbit/s received through the given port (iperf3 server behind it)."""
    if not shutil.which("iperf3"):
        return None
    run = subprocess.run(
        pinned(0, ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]),
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    for _attempt in range(3):
        try:
            report = json.loads(run.stdout)
            return report["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            # The single-client iperf3 server may still be finishing the previous test.
            print(f"  iperf3 via {port}: {run.stdout[-200:]!r}; retrying", file=sys.stderr)
            time.sleep(1)
            run = subprocess.run(
                pinned(0, ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]),
                capture_output=True, text=True, timeout=seconds + 30,
            )  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=4000, help="per target per round")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration per proxy")
    parser.add_argument("--out", default=str(RESULTS / "tcp_echo.json"))
    args = parser.parse_args(argv)

    procs = Processes()
    result: dict = {
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
    }
    with tempfile.TemporaryDirectory(prefix="pyproxy-bench-") as tmp:
        workdir = Path(tmp)
        try:
            # ---- latency: everything on CPU 0 ---------------------------------
            echo = free_port()
            procs.start(
                pinned(
                    0,
                    [
                        sys.executable,
                        "-m",
                        "pyproxy.bench.echo_server",
                        "--listen",
                        f"127.0.0.1:{echo}",
                    ],
                )
            )
            wait_port(echo)
            targets = {"direct": echo}
            ports = {name: free_port() for name in ("nginx", "pyproxy", "pyproxy_clock_off")}
            admin_on, admin_off = free_port(), free_port()
            if start_nginx(procs, workdir, ports["nginx"], echo, 0):
                targets["nginx"] = ports["nginx"]
            start_pyproxy(procs, ports["pyproxy"], echo, admin_on, 0)
            start_pyproxy(procs, ports["pyproxy_clock_off"], echo, admin_off, 0, "--no-stage-clock")
            targets["pyproxy"] = ports["pyproxy"]
            targets["pyproxy_clock_off"] = ports["pyproxy_clock_off"]
            lat = latency(targets, args.rounds, args.messages)
            base = lat["direct"]["p50_us"]
            for values in lat.values():
                values["added_p50_us"] = values["p50_us"] - base
                values["added_p99_us"] = values["p99_us"] - lat["direct"]["p99_us"]
            result["latency"] = lat
            if "nginx" in lat and lat["nginx"]["added_p50_us"] > 0:
                result["pyproxy_vs_nginx_added_p50"] = (
                    lat["pyproxy"]["added_p50_us"] / lat["nginx"]["added_p50_us"]
                )
            result["stage_clock_cost_p50_us"] = (
                lat["pyproxy"]["p50_us"] - lat["pyproxy_clock_off"]["p50_us"]
            )
            time.sleep(0.3)
            snap = get_json(f"http://127.0.0.1:{admin_on}/stats?format=json")
            result["stages"] = snap["listeners"]["main"]
            result["stage_table"] = stage_table(snap)
            result["notify_cost_ns"] = get_json(f"http://127.0.0.1:{admin_on}/server_info")[
                "workers"
            ][0]["notify_cost_ns"]
            procs.stop_all()

            # ---- throughput: proxy on CPU 1, iperf3 on CPU 0 -------------------
            procs = Processes()
            if shutil.which("iperf3"):
                server = free_port()
                procs.start(pinned(0, ["iperf3", "-s", "-p", str(server)]))
                wait_port(server)
                throughput = {"direct": iperf3(server, args.seconds)}
                nginx_port, py_port = free_port(), free_port()
                if start_nginx(procs, workdir, nginx_port, server, 1):
                    throughput["nginx"] = iperf3(nginx_port, args.seconds)
                start_pyproxy(procs, py_port, server, free_port(), 1)
                throughput["pyproxy"] = iperf3(py_port, args.seconds)
                big_port = free_port()
                start_pyproxy(procs, big_port, server, free_port(), 1, "--buffer-size", "262144")
                throughput["pyproxy_256k_buffers"] = iperf3(big_port, args.seconds)
                result["throughput_gbps"] = throughput
        finally:
            procs.stop_all()

    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nresults: {args.out}")
    return 0


def report(result: dict) -> str:
    lines = [
        "| path | p50 µs | p99 µs | added p50 µs | added p99 µs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, v in result["latency"].items():
        lines.append(
            f"| {name} | {v['p50_us']:.1f} | {v['p99_us']:.1f} | {v['added_p50_us']:.1f} | {v['added_p99_us']:.1f} |"
        )
    if "pyproxy_vs_nginx_added_p50" in result:
        lines.append(
            f"\npyproxy added p50 / nginx stream added p50 = **{result['pyproxy_vs_nginx_added_p50']:.2f}×**"
        )
    lines.append(f"stage clock cost (p50, on − off): {result['stage_clock_cost_p50_us']:.2f} µs")
    if "throughput_gbps" in result:
        lines.append("\n| bulk (iperf3) | Gbit/s |\n| --- | ---: |")
        for name, gbps in result["throughput_gbps"].items():
            lines.append(f"| {name} | {gbps:.2f} |" if gbps is not None else f"| {name} | n/a |")
    lines.append("\n```\n" + result["stage_table"] + "```")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
