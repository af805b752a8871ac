"""`pyproxy demo`: an echo service, pyproxy in front of it, traffic through both, the stage breakdown."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request

from pyproxy.bench.echo_client import connect, measure_rtts, summarize
from pyproxy.bench.procs import free_port, wait_port
from pyproxy.stats import stage_table


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _bulk(address: str, total: int) -> float:
    """Push `total` bytes through an echo path and read them back; return MB/s."""
    chunk = b"b" * 65536
    started = time.perf_counter()
    with connect(address) as sock:
        sent = received = 0
        sock.setblocking(False)
        while received < total:
            if sent < total:
                try:
                    sent += sock.send(chunk[: min(len(chunk), total - sent)])
                except BlockingIOError:
                    pass
            try:
                data = sock.recv(1 << 20)
                received += len(data)
            except BlockingIOError:
                time.sleep(0)
    return total / (time.perf_counter() - started) / 1e6


def main(args: argparse.Namespace) -> int:
    app_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    python = sys.executable
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [python, "-m", "pyproxy.bench.echo_server", "--listen", f"127.0.0.1:{app_port}"]
            )
        )
        wait_port(app_port)
        processes.append(
            subprocess.Popen(
                [
                    python,
                    "-m",
                    "pyproxy",
                    "run",
                    "--mode",
                    "tcp",
                    "--listen",
                    f"127.0.0.1:{proxy_port}",
                    "--upstream",
                    f"127.0.0.1:{app_port}",
                    "--admin",
                    f"127.0.0.1:{admin_port}",
                    "--log-level",
                    "warning",
                ]
            )
        )
        wait_port(admin_port)
        wait_port(proxy_port)
        print(
            f"demo: echo service on 127.0.0.1:{app_port}, pyproxy (tcp mode) on 127.0.0.1:{proxy_port}, admin on 127.0.0.1:{admin_port}\n"
        )

        direct = summarize(measure_rtts(f"127.0.0.1:{app_port}", args.messages))
        proxied_rtts: list[int] = []
        per_connection = max(1, args.messages // args.connections)
        for _ in range(args.connections):
            proxied_rtts += measure_rtts(f"127.0.0.1:{proxy_port}", per_connection)
        proxied = summarize(proxied_rtts)
        time.sleep(0.2)  # let the last connection close so its counters are final
        snap = _get_json(f"http://127.0.0.1:{admin_port}/stats?format=json")
        info = _get_json(f"http://127.0.0.1:{admin_port}/server_info")
        bulk_mb = _bulk(f"127.0.0.1:{proxy_port}", 64 * 1024 * 1024)

        print("100-byte echo, one message outstanding")
        print(f"  {'path':<14} {'p50 µs':>8} {'p99 µs':>8}")
        print(f"  {'direct':<14} {direct['p50_us']:>8.1f} {direct['p99_us']:>8.1f}")
        print(f"  {'via pyproxy':<14} {proxied['p50_us']:>8.1f} {proxied['p99_us']:>8.1f}")
        print(
            f"  {'added':<14} {proxied['p50_us'] - direct['p50_us']:>8.1f} {proxied['p99_us'] - direct['p99_us']:>8.1f}"
        )
        print(f"\nbulk echo through pyproxy: {bulk_mb:.0f} MB/s each way\n")

        print(
            "where the sidecar's time went (its own stage clock; per message = per downstream read):"
        )
        sys.stdout.write(stage_table(snap))
        print(
            f"\nevent loop {info['event_loop']}, notify cost calibrated at {info['workers'][0]['notify_cost_ns']} ns per readiness event, "
            + (
                "native module available"
                if info["native"]["available"]
                else f"native module unavailable ({info['native']['reason']}): "
                "python -m pyproxy.native.check says what is missing"
            )
        )
        print(
            f"live numbers: curl http://127.0.0.1:{admin_port}/stats/prometheus  (while a proxy runs: pyproxy stats --admin ...)"
        )
        return 0
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
