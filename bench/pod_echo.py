"""Pod-to-pod TCP echo latency with and without both sidecars, plus each sidecar's stage breakdown.

Path with sidecars: app (pod A) → A's outbound listener → veth/bridge → B's inbound listener →
echo app (pod B), and back. Baseline: the same pods and path with no capture and no sidecar.
Run as root: `python -m pyproxy.bench.pod_echo --count 5000 --max-seconds 20`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from pyproxy.bench.echo_client import measure_rtts, percentile
from pyproxy.bench.results_folder import write_results
from pyproxy.iptables.netns import Pod, missing_capabilities, pods

PY = sys.executable
PROXY_UID = 1337
APP_PORT = 8080
ADMIN = "127.0.0.1:15000"


def measure(host: str, port: int, count: int, size: int, warmup: int, max_seconds: float) -> dict:
    """Round trips of `size`-byte messages, one outstanding; stops at `count` or `max_seconds`."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    rtts = measure_rtts(address, count, size=size, warmup=warmup, max_seconds=max_seconds)
    ordered = sorted(rtts)
    return {
        "count": len(ordered),
        "messages_sent": min(warmup + count, warmup + len(ordered)),
        "p50_us": percentile(ordered, 0.50) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
        "mean_us": (sum(ordered) / len(ordered) / 1000) if ordered else 0.0,
        "truncated_by_time": len(ordered) < count,
    }


def _client(pod: Pod, host: str, args: argparse.Namespace) -> dict:
    argv = [PY, "-m", "pyproxy.bench.pod_echo", "--client", host, "--count", str(args.count)]
    argv += [
        "--size",
        str(args.size),
        "--warmup",
        str(args.warmup),
        "--max-seconds",
        str(args.max_seconds),
    ]
    result = pod.run(argv, timeout=args.max_seconds + 30)
    return json.loads(result.stdout)


def admin_get(pod: Pod, path: str) -> str:
    """GET a path of the pod's sidecar admin server (localhost-only, so from inside the pod)."""
    code = "import sys, urllib.request\nsys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
    return pod.run([PY, "-c", code, f"http://{ADMIN}{path}"], timeout=10).stdout


def _start_sidecar(pod: Pod, mode: str) -> None:
    argv = [
        PY,
        "-m",
        "pyproxy",
        "run",
        "--sidecar",
        "--mode",
        "tcp",
        "--admin",
        ADMIN,
        "--capture-mode",
        mode,
    ]
    caps = {"tproxy": ("net_admin",), "ebpf": ("bpf",)}.get(mode, ())
    proc = pod.popen(
        argv, uid=PROXY_UID, caps=caps, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar in pod {pod.role} exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            admin_get(pod, "/ready")
            return
        time.sleep(0.2)
    raise RuntimeError(f"sidecar in pod {pod.role} not ready")


def _stage_breakdown(listener: dict, messages: int) -> dict:
    stages = listener.get("stages", {})
    total_ns = sum(s["ns"] for s in stages.values())
    per = max(messages, 1)
    return {
        "connections_total": listener.get("connections_total"),
        "bytes": listener.get("bytes"),
        "total_us_per_message": total_ns / 1000 / per,
        "stages_us_per_message": {name: s["ns"] / 1000 / per for name, s in stages.items()},
        "stages_raw": stages,
    }


def run_bench(args: argparse.Namespace) -> dict:
    report: dict = {
        "benchmark": "pod_echo",
        "params": {
            "size": args.size,
            "count": args.count,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "family": args.family,
            "capture_mode": args.mode,
        },
    }
    # eBPF capture attaches to each pod's own cgroup (removed, with its pins, on exit).
    with pods(("a", "b"), bridge=True, cgroups=args.mode == "ebpf") as made:
        a, b = made["a"], made["b"]
        echo = b.popen(
            [
                PY,
                "-m",
                "pyproxy.iptables.probe",
                "echo",
                "--port",
                str(APP_PORT),
                "--lifetime",
                "600",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        if echo.stdout.readline().strip() != "READY":  # type: ignore[union-attr]
            raise RuntimeError("echo app did not start")
        target = b.address(args.family)
        report["baseline"] = _client(a, target, args)
        for pod in (a, b):
            pod.run([PY, "-m", "pyproxy", "capture", "apply", "--mode", args.mode], timeout=60)
        _start_sidecar(a, args.mode)
        _start_sidecar(b, args.mode)
        report["sidecars"] = _client(a, target, args)
        messages = report["sidecars"]["messages_sent"]
        stats_a = json.loads(admin_get(a, "/stats?format=json"))["listeners"]
        stats_b = json.loads(admin_get(b, "/stats?format=json"))["listeners"]
        report["stages"] = {
            "a_outbound": _stage_breakdown(stats_a.get("outbound", {}), messages),
            "b_inbound": _stage_breakdown(stats_b.get("inbound", {}), messages),
        }
    base, side = report["baseline"], report["sidecars"]
    report["added_latency_us"] = {
        "p50": side["p50_us"] - base["p50_us"],
        "p99": side["p99_us"] - base["p99_us"],
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.bench.pod_echo", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="measured round trips (bounded)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="time bound per measurement"
    )
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument(
        "--mode", choices=("redirect", "tproxy", "ebpf"), default="redirect", help="capture mode"
    )
    parser.add_argument("--output", help="also write a results folder here")
    parser.add_argument(
        "--client", metavar="HOST", help=argparse.SUPPRESS
    )  # internal: run inside pod A
    args = parser.parse_args(argv)
    if args.client:
        print(
            json.dumps(
                measure(args.client, APP_PORT, args.count, args.size, args.warmup, args.max_seconds)
            )
        )
        return 0
    missing = missing_capabilities()
    if missing:
        print(f"pod_echo needs: {', '.join(missing)}", file=sys.stderr)
        return 2
    report = run_bench(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        write_results(args.output, report, f"```json\n{text}\n```\n", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
