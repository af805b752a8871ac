"""Echo round-trip latency at one outstanding message: the measuring stick for added latency."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pyproxy.native
from pyproxy.bench.procs import run_tool

from pyproxy.addresses import parse_address

# The C echo pair (native/echo_rtt.c, built by the set-up beside the native module): a client
# and a server with no interpreter between the socket calls, so only the path under test varies.
NATIVE_ECHO = Path(pyproxy.native.__file__).resolve().parent / "echo_rtt"


def connect(address: str) -> socket.socket:
    target = parse_address(address)
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    sock.connect(target.sockaddr())
    if not target.is_unix:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure_rtts(
    address: str, count: int, size: int = 100, warmup: int = 200, max_seconds: float = 0.0
) -> list[int]:
    """Nanosecond round trips of `size`-byte messages, one outstanding at a time.

    With `max_seconds` the run also stops at that deadline (bounded benchmarks).
    """
    payload = b"p" * size
    buf = bytearray(size)
    view = memoryview(buf)
    rtts = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + max_seconds if max_seconds else None
    with connect(address) as sock:
        for i in range(warmup + count):
            if deadline is not None and time.monotonic() > deadline:
                break
            started = clock()
            sock.sendall(payload)
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"EOF after {got} of {size} bytes")
                got += n
            if i >= warmup:
                rtts.append(clock() - started)
    return rtts


def measure_rtts_native(
    address: str, count: int, size: int = 100, warmup: int = 200, cpu: int | None = None,
    *flags: str,
) -> list[int]:  # fmt: skip
    """The same round trips as measure_rtts, measured by the C client (on `cpu` when given)."""
    host, port = address.rsplit(":", 1)
    argv = [str(NATIVE_ECHO), "measure", host, port, str(size), str(count), str(warmup), *flags]
    return json.loads(run_tool(argv, cpu, timeout=300, check=True).stdout)


def stream_echo(address: str, total: int, chunk: int = 65536) -> dict:
    """Push `total` bytes through an echo path while reading them back; MB/s of echoed payload."""
    payload = memoryview(b"s" * chunk)
    buf = bytearray(chunk)
    with connect(address) as sock:
        # With a timeout Python polls and retries: a blocking recv on a sockmap-redirected socket
        # can fail with EAGAIN when another thread's send wakes it with no data queued.
        sock.settimeout(60)

        def send() -> None:
            left = total
            while left > 0:
                left -= sock.send(payload[: min(chunk, left)])
            sock.shutdown(socket.SHUT_WR)

        started = time.perf_counter()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = 0
        while n := sock.recv_into(buf):
            got += n
        seconds = time.perf_counter() - started
        sender.join()
    if got != total:
        raise ConnectionError(f"echoed {got} of {total} bytes")
    return {"bytes": total, "seconds": seconds, "mb_per_s": total / seconds / 1e6}


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return float(sorted_values[index])


def summarize(rtts: list[int]) -> dict:
    ordered = sorted(rtts)
    return {
        "count": len(ordered),
        "p50_us": percentile(ordered, 0.50) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
        "mean_us": sum(ordered) / len(ordered) / 1000 if ordered else 0.0,
    }
