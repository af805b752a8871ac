"""HTTP/1.1 load primitives shared by the HTTP benches: the paths under test, the serial latency
client, wrk runs and their parsing, CPU placement of the proxy under load."""

from __future__ import annotations

import gc
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy.bench.procs import get_json, run_tool, tree_pids

LOAD_CPU, SIDE_CPU = 1, 0  # proxy under load alone on CPU 1; wrk/h2load + upstream on CPU 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_http(port: int, absolute: str | None = None, timeout: float = 20.0) -> None:
    """Until a GET through the port answers 200 (the proxy is up and reaches the upstream)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            rtts = measure_http(port, 1, 0, absolute=absolute, timeout=2.0)
            if rtts:
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"no 200 through 127.0.0.1:{port}: {last}")


def measure_http(
    port: int,
    count: int,
    warmup: int,
    absolute: str | None = None,
    max_seconds: float = 1e9,
    timeout: float = 10.0,
) -> list[int]:
    """Nanosecond GET round trips on one kept-alive connection, one request outstanding."""
    target = absolute or "/"
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: http_bench\r\n\r\n".encode()
    buf = bytearray(65536)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    rtts: list[int] = []
    deadline = clock() + int(max_seconds * 1e9)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for i in range(warmup + count):
                started = clock()
                sock.sendall(request)
                have, need = 0, -1
                while need < 0 or have < need:
                    n = sock.recv_into(view[have:])
                    if not n:
                        raise ConnectionError(f"EOF after {have} bytes of a response")
                    have += n
                    if need < 0:
                        end = buf.find(b"\r\n\r\n", 0, have)
                        if end >= 0:
                            need = end + 4 + _body_length(bytes(buf[:end]))
                if i >= warmup:
                    rtts.append(clock() - started)
                if buf[9:12] != b"200":
                    raise ValueError(f"status {bytes(buf[9:12])!r} from 127.0.0.1:{port}")
                if i >= warmup and clock() > deadline:
                    break
        finally:
            if gc_was:
                gc.enable()
    return rtts


def _body_length(head: bytes) -> int:
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if match is None:
        raise ValueError("response without content-length (the upstream always sends one)")
    return int(match.group(1))


@dataclass
class Path_:
    name: str
    port: int
    pid: int | None = None  # root process of the proxy (None: direct)
    admin: int | None = None  # pyproxy admin port
    absolute: str | None = None  # absolute-form target (forward proxy)
    note: str = ""
    h2_port: int | None = None
    snaps: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        return tree_pids(self.pid) if self.pid else []

    def stats(self) -> dict:
        return get_json(f"http://127.0.0.1:{self.admin}/stats?format=json")


WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_wrk(text: str) -> dict:
    out: dict = {}
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    if match:
        out["requests"] = int(match.group(1))
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if match:
        out["rps"] = float(match.group(1))
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if match:
            out[f"p{pct}_us"] = float(match.group(1)) * WRK_UNITS[match.group(2)]
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in match.groups()) if match else 0
    return out


def run_wrk(p: Path_, workdir: Path, seconds: int, connections: int) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if p.absolute:
        script = workdir / "absolute.lua"
        script.write_text(f'wrk.path = "{p.absolute}"\n')
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{p.port}/")
    return run_load_tool(p, argv, parse_wrk, seconds)


def run_load_tool(p: Path_, argv: list[str], parse: Callable[[str], dict], seconds: int) -> dict:
    """A load generator run for `seconds` on SIDE_CPU; its parsed output (it must count requests)."""
    run = run_tool(argv, SIDE_CPU, timeout=seconds + 30)
    out = parse(run.stdout)
    if "requests" not in out:
        raise RuntimeError(f"{argv[0]} via {p.name}: {run.stdout[-300:]} {run.stderr[-300:]}")
    return out
