"""Loopback microbenchmark of the native I/O paths: plain vs MSG_ZEROCOPY sends, splice vs copy relay.

Run: ``python -m pyproxy.native.microbench [--budget-mib N]``; prints JSON.
Bounded: each case moves at most ``--budget-mib`` MiB and at most
``--max-calls`` sends, over 127.0.0.1 only. The peers (data source and
sink) are separate processes so they do not compete for this one's GIL.

Costs are CPU time of the measuring thread (user+sys, so syscalls count) per
call, which is what the proxy pays; wall-clock throughput is reported too.
On loopback the kernel always copies MSG_ZEROCOPY data on delivery and only
completes a send when the receiver has read it, so zerocopy here shows its
bookkeeping overhead, not the saving it gives on a NIC.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import socket
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from pyproxy import native

SIZES = [100, 1024, 4096, 16384, 65536, 262144]


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
    for sk in (c, s):
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


def _drain(sock: socket.socket, out) -> None:
    buf = bytearray(1 << 20)
    n = 0
    while True:
        k = sock.recv_into(buf)
        if not k:
            break
        n += k
    out.send(n)


def _source(sock: socket.socket, total: int) -> None:
    chunk = b"s" * (1 << 20)
    view = memoryview(chunk)
    left = total
    while left:
        left -= sock.send(view[: min(left, len(chunk))])
    sock.shutdown(socket.SHUT_WR)


def _spawn(target, *args) -> BaseProcess:
    p = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _start_sink() -> tuple[socket.socket, BaseProcess, Connection]:
    c, s = _pair()
    rx, tx = multiprocessing.get_context("fork").Pipe(duplex=False)
    p = _spawn(_drain, s, tx)
    s.close()
    c.setblocking(False)
    return c, p, rx


def bench_send(method: str, size: int, budget: int, max_calls: int) -> dict:
    """Per-send cost of pushing `size`-byte sends into a loopback TCP socket."""
    lib, ffi = native.lib, native.ffi
    calls = max(1, min(max_calls, budget // size))
    sock, proc, rx = _start_sink()
    fd = sock.fileno()
    data = os.urandom(size)
    pin = ffi.from_buffer(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    sender = None
    if method == "zerocopy":
        from .zerocopy import ZeroCopySender

        sender = ZeroCopySender(sock, max_outstanding_bytes=16 << 20, reap_every=32)
    mv = memoryview(data)
    eagain = 0
    deadline = time.monotonic() + 60
    t_wall, t_cpu = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(calls):
        off = 0
        while off < size:
            # A partial send's rest goes out as its own call, as in the proxy.
            if sender is not None:
                n = sender.send(data if not off else mv[off:])
            elif method == "plain":
                n = lib.pp_send(fd, pin + off, size - off)
            else:
                try:
                    n = sock.send(data if not off else mv[off:])
                except BlockingIOError:
                    n = 0
            if n > 0:
                off += n
                continue
            eagain += 1
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            poller.poll(5)
            if sender is not None:
                sender.reap()
    sent = calls * size
    cpu = time.thread_time_ns() - t_cpu
    wall = time.perf_counter_ns() - t_wall
    extra = {}
    if sender is not None:
        sock.shutdown(socket.SHUT_WR)  # sink reads to EOF, so every send completes
        end = time.monotonic() + 30
        while sender.outstanding and time.monotonic() < end:
            select.select([], [], [sock], 0.01)
            sender.reap()
        extra = {
            "zc_sends": sender.zc_sends,
            "completed": sender.completed,
            "copied": sender.copied,
            "fallbacks": sender.fallbacks,
            "notifications": sender.notifications,
        }
    else:
        sock.shutdown(socket.SHUT_WR)
    received = rx.recv() if rx.poll(30) else -1
    proc.join(10)
    sock.close()
    return {
        "method": method,
        "size": size,
        "calls": calls,
        "bytes": sent,
        "received": received,
        "eagain": eagain,
        "cpu_ns_per_send": round(cpu / calls),
        "wall_ns_per_send": round(wall / calls),
        "MBps": round(sent / wall * 1e3, 1),
        **extra,
    }


def bench_relay(method: str, size: int, budget: int, max_calls: int) -> dict:
    """Relay a bulk transfer source -> [this process] -> sink moving at most `size` per call."""
    lib, ffi = native.lib, native.ffi
    total = max(size, min(budget, size * max_calls))
    up_c, up_s = _pair()
    src = _spawn(_source, up_c, total)
    up_c.close()
    down, sink, rx = _start_sink()
    up_s.setblocking(False)
    ifd, ofd = up_s.fileno(), down.fileno()
    poller = select.poll()
    moved = calls = 0
    deadline = time.monotonic() + 60
    t_wall, t_cpu = time.perf_counter_ns(), time.thread_time_ns()
    if method == "splice":
        rfd, wfd, cap = native.pipe(max(size, 4096))
        in_pipe, eof = 0, False
        while not (eof and not in_pipe):
            progress = False
            if not eof and in_pipe < cap:
                r = lib.pp_splice_in(ifd, wfd, min(size, cap - in_pipe))
                calls += 1
                if r > 0:
                    in_pipe += r
                    progress = True
                elif r == 0:
                    eof = True
            if in_pipe:
                w = lib.pp_splice_out(rfd, ofd, in_pipe)
                calls += 1
                if w > 0:
                    in_pipe -= w
                    moved += w
                    progress = True
            if not progress:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                poller.register(ifd, select.POLLIN if not eof and in_pipe < cap else 0)
                poller.register(ofd, select.POLLOUT if in_pipe else 0)
                poller.poll(5)
                poller.unregister(ifd)
                poller.unregister(ofd)
        os.close(rfd)
        os.close(wfd)
    else:
        buf = bytearray(size)
        cbuf = ffi.from_buffer(buf)
        sent_p = ffi.new("size_t *")
        while True:
            if method == "relay_copy":
                n = lib.pp_relay_copy(ifd, ofd, cbuf, size, sent_p)
                calls += 1
                done = sent_p[0] if n > 0 else 0
            else:
                try:
                    n = up_s.recv_into(buf)
                except BlockingIOError:
                    n = native.EAGAIN
                calls += 1
                done = 0
            if n == 0:
                break
            if n < 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                poller.register(ifd, select.POLLIN)
                poller.poll(5)
                poller.unregister(ifd)
                continue
            while done < n:  # flush what the fused call (or recv) left behind
                w = lib.pp_send(ofd, cbuf + done, n - done)
                calls += 1
                if w > 0:
                    done += w
                else:
                    poller.register(ofd, select.POLLOUT)
                    poller.poll(5)
                    poller.unregister(ofd)
            moved += n
    cpu = time.thread_time_ns() - t_cpu
    wall = time.perf_counter_ns() - t_wall
    down.shutdown(socket.SHUT_WR)
    received = rx.recv() if rx.poll(30) else -1
    src.join(10)
    sink.join(10)
    up_s.close()
    down.close()
    return {
        "method": method,
        "size": size,
        "bytes": moved,
        "received": received,
        "calls": calls,
        "cpu_ns_per_KiB": round(cpu / (moved / 1024), 1),
        "MBps": round(moved / wall * 1e3, 1),
    }


def _crossover(rows: list[dict], fast: str, slow: str, key: str) -> int | None:
    """Smallest size from which `fast` stays cheaper than `slow` for every larger size."""
    by = {(r["method"], r["size"]): r[key] for r in rows}
    answer = None
    for size in reversed(SIZES):
        if by[(fast, size)] < by[(slow, size)]:
            answer = size
        else:
            break
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=int, default=64, help="max MiB moved per case")
    ap.add_argument("--max-calls", type=int, default=50_000, help="max sends per case")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    args = ap.parse_args(argv)
    if not native.AVAILABLE:
        print(json.dumps({"error": native.UNAVAILABLE_REASON}))
        return 1
    budget = args.budget_mib << 20

    def best(fn, method, size, key):
        runs = [fn(method, size, budget, args.max_calls) for _ in range(args.repeat)]
        return min(runs, key=lambda r: r[key])

    send_rows = [
        best(bench_send, m, s, "cpu_ns_per_send")
        for s in SIZES
        for m in ("plain", "socket.send", "zerocopy")
    ]
    relay_rows = [
        best(bench_relay, m, s, "cpu_ns_per_KiB")
        for s in SIZES
        for m in ("recv_send", "relay_copy", "splice")
    ]
    result = {
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "send": send_rows,
        "relay": relay_rows,
        "crossover": {
            "zerocopy_beats_plain_cpu_from": _crossover(
                send_rows, "zerocopy", "plain", "cpu_ns_per_send"
            ),
            "splice_beats_recv_send_cpu_from": _crossover(
                relay_rows, "splice", "recv_send", "cpu_ns_per_KiB"
            ),
            "splice_beats_relay_copy_cpu_from": _crossover(
                relay_rows, "splice", "relay_copy", "cpu_ns_per_KiB"
            ),
        },
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
