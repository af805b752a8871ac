"""Pod-to-pod TCP echo latency with and without both sidecars, plus each sidecar's stage breakdown.

Path with sidecars: app (pod A) → A's outbound listener → veth/bridge → B's inbound listener →
echo app (pod B), and back. Baseline: the same pods and path with no capture and no sidecar.
Run as root: `python -m pyproxy.bench.pod_echo --count 5000 --max-seconds 20`.

`--mode ebpf --sockmap` also carries each app's connection to its sidecar socket to socket
(`ipc: sockmap` on the outbound listener). `--compare ROUNDS` runs iptables REDIRECT and eBPF
capture + sockmap in alternating rounds (fresh pods each time) at every `--sizes` size, with a
throughput stream per path, and reports medians of the per-round ratios.

The client app and the echo app are the C pair in native/echo_rtt.c by default (no interpreter
whose own cost and scheduling swamp the few microseconds the paths differ by); `--instrument
python` runs the Python pair (and is needed for `--family 6`). The stream is Python's either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml
from pyproxy.bench.echo_client import (
    NATIVE_ECHO,
    measure_rtts,
    measure_rtts_native,
    percentile,
    stream_echo,
)
from pyproxy.bench.pod_sidecar import ADMIN, PROXY_UID
from pyproxy.bench.procs import (
    add_halt_poll_option,
    halt_poll_refused,
    halt_polling,
    move_to_cpu,
    on_cpus,
    pinned,
    tree_pids,
)
from pyproxy.bench.results_folder import write_results
from pyproxy.iptables.netns import Pod, missing_capabilities, pods

from pyproxy.config import sidecar_listeners

PY = sys.executable
APP_UID = 1000  # the client app: an ordinary uid, captured on every path
APP_PORT = 8080


def measure(
    host: str, port: int, count: int, size: int, warmup: int, max_seconds: float, instrument: str
) -> dict:
    """Round trips of `size`-byte messages, one outstanding; stops at `count` or (the Python
    client) `max_seconds`."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if instrument == "c":
        rtts = measure_rtts_native(address, count, size, warmup)
    else:
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


def client_run(host: str, args: argparse.Namespace) -> dict:
    """Inside pod A: one connection per size, then (with --stream-bytes) one bulk stream."""
    out: dict = {
        "sizes": {
            str(size): measure(
                host, APP_PORT, args.count, size, args.warmup, args.max_seconds, args.instrument
            )
            for size in args.sizes
        }
    }
    if args.stream_bytes:
        address = f"[{host}]:{APP_PORT}" if ":" in host else f"{host}:{APP_PORT}"
        streams = [stream_echo(address, args.stream_bytes) for _ in range(args.streams)]
        # The median stream: one transfer of a few tens of MB lasts a tenth of a second, which
        # a busy machine's slow spell can halve.
        out["stream"] = sorted(streams, key=lambda s: s["mb_per_s"])[len(streams) // 2]
        out["stream"]["mb_per_s_all"] = [s["mb_per_s"] for s in streams]
    return out


def _client(pod: Pod, host: str, args: argparse.Namespace) -> dict:
    argv = [PY, "-m", "pyproxy.bench.pod_echo", "--client", host, "--count", str(args.count)]
    argv += [
        "--sizes",
        ",".join(map(str, args.sizes)),
        "--warmup",
        str(args.warmup),
        "--max-seconds",
        str(args.max_seconds),
        "--stream-bytes",
        str(args.stream_bytes),
        "--streams",
        str(args.streams),
        "--instrument",
        args.instrument,
    ]
    if args.cpu is not None:  # it pins itself: taskset cannot exec the venv's python as its uid
        argv += ["--cpu", str(args.cpu)]
    result = pod.run(argv, uid=APP_UID, timeout=args.max_seconds * len(args.sizes) + 60)
    return json.loads(result.stdout)


def admin_get(pod: Pod, path: str) -> str:
    """GET a path of the pod's sidecar admin server (localhost-only, so from inside the pod)."""
    code = "import sys, urllib.request\nsys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
    return pod.run([PY, "-c", code, f"http://{ADMIN}{path}"], timeout=10).stdout


def sockmap_sidecar_config(directory: Path) -> Path:
    """The sidecar's two capture listeners (eBPF capture), IPv4 only, outbound with ipc: sockmap.

    sockmap needs fixed IPv4 listen addresses, which the --sidecar flags (IPv4 and IPv6
    wildcards) do not give, and a root sidecar (the loader requires euid 0), so the capture
    excludes uid 0 instead of 1337 (`capture_args`).
    """
    listeners = []
    for listener in sidecar_listeners("tcp", "ebpf"):
        listener = dict(listener, addresses=[a for a in listener["addresses"] if "[" not in a])
        if listener["kind"] == "outbound":
            listener.update(ipc="sockmap", app_side="downstream")
        listeners.append(listener)
    path = directory / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(
            {"admin": ADMIN, "allow_root": True, "listeners": listeners}, sort_keys=False
        )
    )
    directory.chmod(0o755)
    path.chmod(0o644)
    return path


def _start_sidecar(pod: Pod, mode: str, config: Path | None, cpu: int | None) -> None:
    argv = [PY, "-m", "pyproxy", "run"]
    if config is None:
        argv += ["--sidecar", "--mode", "tcp", "--admin", ADMIN, "--capture-mode", mode]
    else:
        argv += ["-c", str(config)]
    caps = {"tproxy": ("net_admin",), "ebpf": ("bpf",)}.get(mode, ())
    uid = PROXY_UID if config is None else None  # the sockmap sidecar runs as root
    proc = pod.popen(argv, uid=uid, caps=caps, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar in pod {pod.role} exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            admin_get(pod, "/ready")
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"sidecar in pod {pod.role} not ready")
    if cpu is not None:  # moved once its workers exist (taskset cannot exec as the proxy's uid)
        move_to_cpu(tree_pids(proc.pid), cpu)


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


def capture_args(mode: str, sockmap: bool) -> list[str]:
    """`pyproxy capture apply` for a path: the sidecar's own uid/gid is never captured."""
    argv = [PY, "-m", "pyproxy", "capture", "apply", "--mode", mode]
    return argv + (["--proxy-uid", "0", "--proxy-gid", "0"] if sockmap else [])


def ipc_path(pod: Pod) -> dict:
    """The outbound listener's app-facing IPC path as the sidecar reports it."""
    info = json.loads(admin_get(pod, "/server_info"))
    return info["io_backends"]["listeners"]["outbound"]["ipc_path"]


@contextlib.contextmanager
def _config_dir(sockmap: bool) -> Iterator[Path | None]:
    if not sockmap:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pod-echo-") as name:
        yield sockmap_sidecar_config(Path(name))


def _echo_argv(instrument: str) -> list[str]:
    """The echo app in pod B: the C echo (one connection at a time; the paths' connections come
    one after another) or the Python one, on every address of the pod."""
    if instrument == "c":
        return [str(NATIVE_ECHO), "serve", str(APP_PORT), "0.0.0.0"]
    argv = [PY, "-m", "pyproxy.iptables.probe", "echo", "--port", str(APP_PORT)]
    return [*argv, "--lifetime", "600"]


def run_path(args: argparse.Namespace, mode: str, sockmap: bool) -> dict:
    """Fresh pods; every size (and the stream) without sidecars, then with both sidecars."""
    report: dict = {"capture_mode": mode, "sockmap": sockmap}
    # eBPF capture and sockmap attach to each pod's own cgroup (removed, with pins, on exit).
    with (
        _config_dir(sockmap) as config,
        pods(("a", "b"), bridge=True, cgroups=mode == "ebpf") as made,
    ):
        a, b = made["a"], made["b"]
        argv = pinned(args.cpu, _echo_argv(args.instrument))
        echo = b.popen(argv, stdout=subprocess.PIPE, text=True)
        if echo.stdout.readline().strip() != "READY":  # type: ignore[union-attr]
            raise RuntimeError("echo app did not start")
        target = b.address(args.family)
        report["baseline"] = _client(a, target, args)
        for pod in (a, b):
            pod.run(capture_args(mode, sockmap), timeout=60)
        _start_sidecar(a, mode, config, args.cpu)
        _start_sidecar(b, mode, config, args.cpu)
        report["sidecars"] = _client(a, target, args)
        messages = sum(m["messages_sent"] for m in report["sidecars"]["sizes"].values())
        stats_a = json.loads(admin_get(a, "/stats?format=json"))["listeners"]
        stats_b = json.loads(admin_get(b, "/stats?format=json"))["listeners"]
        report["stages"] = {
            "a_outbound": _stage_breakdown(stats_a.get("outbound", {}), messages),
            "b_inbound": _stage_breakdown(stats_b.get("inbound", {}), messages),
        }
        report["a_outbound_ipc_path"] = ipc_path(a)
    report["added_latency_us"] = {
        size: {
            "p50": side["p50_us"] - report["baseline"]["sizes"][size]["p50_us"],
            "p99": side["p99_us"] - report["baseline"]["sizes"][size]["p99_us"],
        }
        for size, side in report["sidecars"]["sizes"].items()
    }
    return report


def _params(args: argparse.Namespace) -> dict:
    return {
        "sizes": args.sizes,
        "count": args.count,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "family": args.family,
        "stream_bytes": args.stream_bytes,
        "streams": args.streams,
        "instrument": args.instrument,
        "cpu": args.cpu,
    }


def run_bench(args: argparse.Namespace) -> dict:
    """One path; with one size the report keeps that size's figures at the top level."""
    path = run_path(args, args.mode, args.sockmap)
    params = dict(_params(args), capture_mode=args.mode, sockmap=args.sockmap)
    report: dict = {"benchmark": "pod_echo", "params": params, **path}
    if len(args.sizes) == 1:
        size = str(args.sizes[0])
        report["params"]["size"] = args.sizes[0]
        for key in ("baseline", "sidecars"):
            report[key] = dict(report[key]["sizes"][size], stream=report[key].get("stream"))
        report["added_latency_us"] = report["added_latency_us"][size]
    return report


PATHS = {"iptables": ("redirect", False), "ebpf_sockmap": ("ebpf", True)}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare_summary(rounds: list[dict], sizes: Sequence[int]) -> dict:
    """Per size: added p50/p99 per path and eBPF+sockmap / iptables ratios, medians over rounds."""
    summary: dict = {"sizes": {}}
    for size in map(str, sizes):
        row: dict = {}
        for name in PATHS:
            for q in ("p50", "p99"):
                row[f"{name}_added_{q}_us"] = _spread(
                    [r[name]["added_latency_us"][size][q] for r in rounds]
                )
        for q in ("p50", "p99"):
            row[f"added_{q}_ratio"] = _spread(
                [
                    r["ebpf_sockmap"]["added_latency_us"][size][q]
                    / r["iptables"]["added_latency_us"][size][q]
                    for r in rounds
                ]
            )
        summary["sizes"][size] = row
    if all("stream" in r[name]["sidecars"] for r in rounds for name in PATHS):
        summary["stream_mb_per_s"] = {
            name: _spread([r[name]["sidecars"]["stream"]["mb_per_s"] for r in rounds])
            for name in PATHS
        }
        summary["stream_ratio"] = _spread(
            [
                r["ebpf_sockmap"]["sidecars"]["stream"]["mb_per_s"]
                / r["iptables"]["sidecars"]["stream"]["mb_per_s"]
                for r in rounds
            ]
        )
    return summary


def run_compare(args: argparse.Namespace) -> dict:
    """iptables REDIRECT vs eBPF capture + sockmap, order alternating round by round."""
    rounds = []
    names = list(PATHS)
    for index in range(args.compare):
        order = names if index % 2 == 0 else names[::-1]
        measured = {}
        for name in order:
            mode, sockmap = PATHS[name]
            measured[name] = run_path(args, mode, sockmap)
        rounds.append({"order": order, **measured})
    return {
        "benchmark": "pod_echo_compare",
        "params": dict(_params(args), rounds=args.compare, paths=PATHS),
        "summary": compare_summary(rounds, args.sizes),
        "rounds": rounds,
    }


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 100,1024, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive byte counts, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.bench.pod_echo", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="measured round trips (bounded)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--size", type=int, help="message size in bytes (default 100)")
    parser.add_argument(
        "--sizes", type=_sizes, help="comma-separated message sizes, e.g. 100,1024,4096,10240"
    )
    parser.add_argument(
        "--stream-bytes",
        type=int,
        help="also echo this many bytes in one stream per path and report MB/s "
        "(default: 0, or 16 MiB with --compare)",
    )
    parser.add_argument(
        "--streams", type=int, default=1,
        help="streams per path and round; the median one is reported",
    )  # fmt: skip
    parser.add_argument(
        "--sockmap",
        action="store_true",
        help="with --mode ebpf: the outbound listener takes the app's connections over sockmap",
    )
    parser.add_argument(
        "--compare",
        type=int,
        metavar="ROUNDS",
        help="iptables REDIRECT vs eBPF capture + sockmap, alternating, this many rounds",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="time bound per measurement"
    )
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument(
        "--instrument", choices=("c", "python"), default="c",
        help="the client app and echo app: the C pair (native/echo_rtt.c, IPv4) or Python's",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=("redirect", "tproxy", "ebpf"), default="redirect", help="capture mode"
    )
    parser.add_argument(
        "--cpu", type=int,
        help="run both apps and both sidecars on this CPU (every wake-up local; default: where "
        "the scheduler puts them, which on a VM makes each round's figures depend on whether "
        "its wake-ups crossed CPUs)",
    )  # fmt: skip
    parser.add_argument("--output", help="also write a results folder here")
    add_halt_poll_option(parser)
    parser.add_argument(
        "--client", metavar="HOST", help=argparse.SUPPRESS
    )  # internal: run inside pod A
    args = parser.parse_args(argv)
    if args.size is not None and args.sizes is not None:
        parser.error("give --size or --sizes, not both")
    args.sizes = args.sizes or [args.size or 100]
    if args.stream_bytes is None:
        args.stream_bytes = 16 * 1024 * 1024 if args.compare else 0
    if args.stream_bytes < 0:
        parser.error("--stream-bytes must be 0 or more")
    if args.streams < 1:
        parser.error("--streams must be 1 or more")
    if args.client:
        with on_cpus(args.cpu):
            print(json.dumps(client_run(args.client, args)))
        return 0
    if args.sockmap and args.mode != "ebpf":
        parser.error(
            "--sockmap is for --mode ebpf (iptables capture is the path it is compared to)"
        )
    if (args.sockmap or args.compare) and args.family != 4:
        parser.error("sockmap redirects IPv4 connections only: use --family 4")
    if args.instrument == "c" and args.family != 4:
        parser.error("the C echo pair speaks IPv4: use --instrument python with --family 6")
    if args.instrument == "c" and not NATIVE_ECHO.exists():
        parser.error(f"{NATIVE_ECHO} missing (built from native/echo_rtt.c by the set-up)")
    if args.compare is not None and args.compare < 1:
        parser.error("--compare needs at least one round")
    missing = missing_capabilities()
    if missing:
        print(f"pod_echo needs: {', '.join(missing)}", file=sys.stderr)
        return 2
    if refused := halt_poll_refused(args.halt_poll_ns):
        parser.error(refused)
    with halt_polling(args.halt_poll_ns) as polled:
        report = run_compare(args) if args.compare else run_bench(args)
    report["halt_poll_ns"] = polled
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        write_results(args.output, report, f"```json\n{text}\n```\n", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
