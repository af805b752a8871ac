"""Memory under many idle connections: a worker's RSS at rest, with N idle connections open, after they close.

Spawns an upstream (the echo server for TCP mode, nginx for HTTP mode) and
`pyproxy run` with one in-process worker, opens N connections from this
process (TCP: connected and silent; HTTP: one keep-alive GET answered, then
silent), and samples the worker's VmRSS from /proc once the proxy's
`connections_active` says every one of them is held. Then it closes them all,
waits for `connections_active` to reach 0 and samples again. Prints JSON and
writes bench/results/memory-<mode>.json.

    python -m pyproxy.bench.memory --mode tcp --connections 10000
    python -m pyproxy.bench.memory --mode http --allocator malloc

``--allocator malloc`` runs the proxy with PYTHONMALLOC=malloc (what comes back after
the close depends on it: pyproxy/memory_trim.py); the default is CPython's pymalloc.
``--baseline-tree PATH`` measures that checkout's pyproxy too, alternating with this one
(``--pairs`` times each), and reports both side by side under ``before`` and ``after``.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.http_bench import Processes, start_upstream
from pyproxy.bench.http_load import _body_length
from pyproxy.bench.procs import add_baseline_tree, baseline_tree_python, get_json
from pyproxy.bench.results_folder import default_out, write_results

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_fd_limit(wanted: int) -> None:
    """This process holds N client sockets and its children inherit the limit (echo server: N more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_response(sock: socket.socket) -> None:
    """One HTTP/1.1 response with Content-Length (nginx's fixed answer), read to its last byte."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed before the response head")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    need = end + _body_length(data[: end - 4])
    while len(data) < need:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed inside the response body")
        data += chunk


def open_idle(port: int, count: int, http: bool) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if http:
            sock.sendall(REQUEST)
            read_response(sock)
        conns.append(sock)
    return conns


def wait_active(admin: int, wanted: int, timeout: float) -> int:
    """Poll the proxy's stats until `connections_active` equals `wanted`; the last value seen."""
    deadline = time.monotonic() + timeout
    active = -1
    while time.monotonic() < deadline:
        snap = get_json(f"http://127.0.0.1:{admin}/stats?format=json")
        active = snap["listeners"]["main"]["connections_active"]
        if active == wanted:
            return active
        time.sleep(0.1)
    return active


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS once the proxy has had `seconds` to finish what the last event started."""
    time.sleep(seconds)
    return rss_kib(pid)


def measure(
    mode: str,
    connections: int,
    rounds: int,
    extra: list[str],
    settle: float = 12.0,
    allocator: str = "pymalloc",
    python: str = sys.executable,
) -> dict:
    """Open/close rounds; `settle`: seconds after the last close before the RSS sample (the
    worker trims over ~10 s: pooled upstream connections close after their idle timeout);
    `allocator`: the proxy's PYTHONMALLOC; `python`: whose pyproxy runs (another checkout's)."""
    raise_fd_limit(2 * connections + 1024)
    with tempfile.TemporaryDirectory(prefix="pyproxy-memory-") as tmp:
        procs = Processes(Path(tmp))
        try:
            if mode == "tcp":
                upstream = peers.echo_server(procs, None).ready().port
            else:
                upstream = start_upstream(procs, Path(tmp))
            proxy = peers.pyproxy_flags(
                procs, "pyproxy", upstream, None, "--max-connections", str(connections + 64),
                *extra, mode=mode, env={"PYTHONMALLOC": allocator}, python=python,
            ).ready()  # fmt: skip
            port, admin = proxy.port, proxy.admin
            pid = get_json(f"http://127.0.0.1:{admin}/server_info")["workers"][0]["pid"]
            # The readiness probes above were connections too: let them close first.
            wait_active(admin, 0, 10)
            result: dict = {"mode": mode, "connections": connections, "extra_args": extra,
                            "settle_seconds": settle, "allocator": allocator}  # fmt: skip
            result["baseline_kib"] = baseline = settle_rss(pid)
            result["rounds"] = []
            for _ in range(rounds):
                t0 = time.monotonic()
                conns = open_idle(port, connections, http=mode == "http")
                opened_s = time.monotonic() - t0
                active = wait_active(admin, connections, 30)
                held = settle_rss(pid)
                for sock in conns:
                    sock.close()
                remaining = wait_active(admin, 0, 60)
                after = settle_rss(pid, settle)
                result["rounds"].append(
                    {
                        "open_seconds": round(opened_s, 2),
                        "active_seen": active,
                        "held_kib": held,
                        "per_connection_bytes": round((held - baseline) * 1024 / connections),
                        "active_after_close": remaining,
                        "after_close_kib": after,
                        "after_close_above_baseline_kib": after - baseline,
                    }
                )
            worst = max(r["per_connection_bytes"] for r in result["rounds"])
            result["per_connection_bytes"] = worst
            result["after_close_above_baseline_kib"] = result["rounds"][-1][
                "after_close_above_baseline_kib"
            ]
        finally:
            procs.stop_all()
    return result


def compare(run, baseline_python: str, pairs: int) -> dict:
    """The baseline tree's pyproxy and this one's, measured in turn `pairs` times (the machine's
    drift falls on both); each side's after-close figures listed, and their ranges."""
    runs: dict[str, list] = {"before": [], "after": []}
    for _ in range(pairs):
        runs["before"].append(run(python=baseline_python))
        runs["after"].append(run())
    out: dict = {"baseline_python": baseline_python, "runs": runs}
    for side, results in runs.items():
        above = [r["after_close_above_baseline_kib"] for r in results]
        out[f"{side}_after_close_above_baseline_kib"] = [min(above), max(above)]
        out[f"{side}_per_connection_bytes"] = max(r["per_connection_bytes"] for r in results)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("tcp", "http"), default="tcp")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2, help="open/close cycles (growth shows)")
    parser.add_argument("--settle", type=float, default=12.0, help="seconds after close")
    parser.add_argument("--allocator", choices=("pymalloc", "malloc"), default="pymalloc",
                        help="the proxy's PYTHONMALLOC")  # fmt: skip
    parser.add_argument("--out", default="",
                        help="default: bench/results/memory-<mode>[-malloc].json")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=1,
                        help="with --baseline-tree: before/after measurements, alternating")  # fmt: skip
    add_baseline_tree(parser)
    parser.add_argument("extra", nargs="*", help="more `pyproxy run` arguments (after --)")
    args = parser.parse_args(argv)
    baseline = baseline_tree_python(parser, args)
    run = partial(measure, args.mode, args.connections, args.rounds, args.extra, args.settle,
                  args.allocator)  # fmt: skip
    if baseline is None:
        result = run()
    else:
        result = compare(run, str(baseline), args.pairs)
    suffix = "-malloc" if args.allocator == "malloc" else ""
    text = json.dumps(result, indent=2)
    write_results(args.out or default_out(f"memory-{args.mode}{suffix}"), result,
                  f"```json\n{text}\n```\n", args)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
