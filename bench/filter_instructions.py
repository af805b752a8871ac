"""Instructions per request a filter adds in the proxy's process, counted by callgrind.

`python -m pyproxy.bench.filter_instructions --only wasm,wasm_sdk` runs one pyproxy per
configuration (no filter, and each one named: filter_bench's configurations) under
`valgrind --tool=callgrind`, in front of nginx answering 100 bytes; per proxy, 300 warm-up
GETs on one kept-alive connection, the counters zeroed, then 1000 serial GETs and a dump:
the process's instructions (Ir) divided by the requests. Counted instructions repeat to a
fraction of a percent on a noisy machine where clocks do not, so this is where a change to
the per-request path is judged first (the end-to-end clocks in filter_bench confirm it).

With --baseline-tree PATH, that checkout's pyproxy is counted too, as before_<name>. The
callgrind files are kept in --keep DIR for callgrind_annotate when given.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.filter_bench import CHAIN_ORDER, configurations
from pyproxy.bench.filter_configs import filter_entry
from pyproxy.bench.http_bench import Processes, start_upstream
from pyproxy.bench.procs import add_baseline_tree, baseline_tree_python, run_tool

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _gets(sock: socket.socket, n: int) -> None:
    """`n` serial GETs on one connection, each answer read whole (Content-Length framed)."""
    buf = b""
    for _ in range(n):
        sock.sendall(REQUEST)
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buf[:head_end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                end = head_end + 4 + length
                if len(buf) >= end:
                    if not buf.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"not a 200: {buf[:80]!r}")
                    buf = buf[end:]
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the proxy closed the connection")
            buf += chunk


def _total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def count(
    procs: Processes, workdir: Path, name: str, filters: tuple[str, ...], upstream: int,
    python: str, warmup: int, requests: int,
) -> float:  # fmt: skip
    """Instructions per request of one proxy under callgrind."""
    chain = [filter_entry(k, workdir, name) for k in CHAIN_ORDER if k in filters]
    listener: dict = {"mode": "http", "upstream": f"127.0.0.1:{upstream}",
                      "http": {"codec": "fast"}}  # fmt: skip
    if chain:
        listener["filters"] = chain
    out = workdir / f"callgrind.{name}"
    started = peers.pyproxy_config(
        procs, workdir, name, listener, None, python=python,
        under=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"),
    ).ready(timeout=180)  # fmt: skip
    with socket.create_connection(("127.0.0.1", started.port), timeout=10) as sock:
        _gets(sock, warmup)
        run_tool(["callgrind_control", "-z", str(started.pid)], check=True)
        _gets(sock, requests)
        run_tool(["callgrind_control", "-d", str(started.pid)], check=True)
    dumps = sorted(workdir.glob(f"callgrind.{name}.{started.pid}.*"))
    if not dumps:
        raise RuntimeError(f"{name}: callgrind wrote no dump")
    return _total(dumps[-1]) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="wasm,wasm_sdk",
                        help="comma-separated configurations besides no filter")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files here")
    add_baseline_tree(parser)
    args = parser.parse_args(argv)
    base_python = baseline_tree_python(parser, args)
    configs = configurations(args.only)
    configs.pop("baseline_b", None)
    trees = [("", sys.executable)]
    if base_python is not None:
        trees.append(("before_", str(base_python)))
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pyproxy-filter-instructions-") as tmp:
        workdir = Path(tmp)
        procs = Processes()
        try:
            upstream = start_upstream(procs, workdir)
            for prefix, python in trees:
                for name, filters in configs.items():
                    label = prefix + name
                    print(f"counting {label} ...", file=sys.stderr, flush=True)
                    result[label] = count(procs, workdir, label, filters, upstream, python,
                                          args.warmup, args.requests)  # fmt: skip
        finally:
            procs.stop_all()
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                for path in workdir.glob("callgrind.*"):
                    shutil.copy(path, keep / path.name)
    print("| configuration | instructions per request | added over no filter |")
    print("| --- | ---: | ---: |")
    for label, per_request in result.items():
        base = result["before_baseline" if label.startswith("before_") else "baseline"]
        print(f"| {label} | {per_request:,.0f} | {per_request - base:+,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
