"""Native I/O paths (MeshInsight §6.2 on pyproxy): UDS vs loopback-TCP IPC, zerocopy vs copy writes, splice vs userspace relay.

Echo through a standalone TCP-mode pyproxy whose app (bench/echo_server.py)
sits behind loopback TCP or a Unix socket, at message sizes 100 B .. 256 KiB:

* serial: one outstanding message: p50 round trip, added p50 over the direct
  path, proxy CPU per message and the `ipc` stage per message (/stats deltas);
* load: 8 connections, each with one outstanding message: messages/s and
  proxy CPU per message.

Placement: serial runs everything on CPU 0, like bench/tcp_echo.py, so no
configuration wins by spreading work and latencies compare with that bench;
load gives the proxy CPU 1 to itself (a sidecar with its own core), client
and app share CPU 0. Proxy CPU is its utime+stime, read at nanosecond
resolution from /proc/<pid>/task/*/schedstat (the same quantity
/proc/<pid>/stat reports in 10 ms ticks, too coarse for these points).
Bulk: on a 2-CPU host the iperf3 pair on CPU 0 caps every path near the same
Gbit/s, so each path's CPU per GB moved is reported too (proxy on CPU 1).

Variants: tcp (copy), uds (copy), tcp-zerocopy (MSG_ZEROCOPY for every send,
threshold 0, so the crossover against copy shows). Bulk: iperf3 (TCP only:
it cannot use UDS) through nginx stream, haproxy, and pyproxy with the
userspace copy relay and the splice relay; proxy on CPU 1, iperf3 on CPU 0.
Bounded: per point at most --messages round trips and --point-seconds; the
whole run stays under 5 minutes. Results go to bench/results/native_paths/.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pyproxy.bench import peers
from pyproxy.bench.echo_client import connect, measure_rtts, summarize
from pyproxy.bench.procs import Processes, cpu_seconds, get_json, move_to_cpu, on_cpus
from pyproxy.bench.results_folder import default_out, inputs_of, publish
from pyproxy.bench.tcp_echo import iperf3, start_nginx

SIZES = (100, 1024, 4096, 16384, 65536, 262144)
VARIANTS = {
    # name: (app transport, extra listener config)
    "tcp": ("tcp", {}),
    "uds": ("uds", {}),
    "tcp-zerocopy": ("tcp", {"write": "zerocopy", "zerocopy_threshold": 0}),
}
LOAD_CONNECTIONS = 8


def wait_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


class Proxy:
    """One pyproxy process from a generated config; knows its pid, admin and listen port."""

    def __init__(self, procs: Processes, workdir: Path, name: str, upstream: str, extra: dict):
        self.name = name
        started = peers.pyproxy_config(procs, workdir, name, {"upstream": upstream, **extra}, 1)
        started.ready()
        self.port, self.admin, self.pid = started.port, started.admin, started.pid

    def stats(self) -> dict:
        return get_json(f"http://127.0.0.1:{self.admin}/stats?format=json")["listeners"]["main"]


def measured(proxy: Proxy | None, run) -> dict:
    """Run `run()` -> round trips; add proxy CPU and ipc-stage time per round trip."""
    before_cpu = cpu_seconds([proxy.pid]) if proxy else 0.0
    before = proxy.stats() if proxy else {}
    t0 = time.perf_counter()
    out = run()
    wall = time.perf_counter() - t0
    trips = out["round_trips"]
    if proxy:
        after = proxy.stats()
        cpu = cpu_seconds([proxy.pid]) - before_cpu
        ipc_ns = after["stages"]["ipc"]["ns"] - before["stages"]["ipc"]["ns"]
        out["proxy_cpu_us_per_msg"] = cpu / trips * 1e6
        out["ipc_us_per_msg"] = ipc_ns / trips / 1000
        if "zerocopy" in after:
            out["zerocopy"] = {
                k: after["zerocopy"][k] - before["zerocopy"].get(k, 0)
                for k in ("sends", "plain_sends", "completed", "copied")
            }
    out["msgs_per_s"] = trips / wall
    return out


def serial(address: str, size: int, count: int) -> dict:
    rtts = measure_rtts(address, count, size=size, warmup=min(100, count // 4))
    return {"round_trips": len(rtts) + min(100, count // 4), **summarize(rtts)}


def load(address: str, size: int, seconds: float, max_trips: int) -> dict:
    """LOAD_CONNECTIONS connections, one outstanding message each, for `seconds` or `max_trips`."""
    payload = b"l" * size
    socks = [connect(address) for _ in range(LOAD_CONNECTIONS)]
    ep = select.epoll()
    state = {}
    try:
        for s in socks:
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            state[s.fileno()] = [s, 0, memoryview(payload), time.perf_counter_ns()]
            _push(state[s.fileno()])
        trips, rtts = 0, []
        buf = bytearray(1 << 20)
        deadline = time.monotonic() + seconds
        while trips < max_trips and time.monotonic() < deadline:
            for fd, _ev in ep.poll(1.0):
                st = state[fd]
                try:
                    n = st[0].recv_into(buf)
                except BlockingIOError:
                    continue
                if not n:
                    raise ConnectionError("echo closed")
                st[1] += n
                if st[2]:
                    _push(st)
                if st[1] >= size:
                    now = time.perf_counter_ns()
                    rtts.append(now - st[3])
                    trips += 1
                    st[1] -= size
                    st[2], st[3] = memoryview(payload), now
                    _push(st)
        return {"round_trips": trips, **summarize(rtts)}
    finally:
        for s in socks:
            s.close()
        ep.close()


def _push(st: list) -> None:
    """Send what the socket takes of the pending message (the rest on the next wake-up)."""
    view = st[2]
    try:
        n = st[0].send(view)
    except BlockingIOError:
        n = 0
    st[2] = view[n:] if n < len(view) else None
    if st[2] is not None and not len(st[2]):
        st[2] = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1500, help="max round trips per point")
    parser.add_argument("--point-seconds", type=float, default=1.5, help="max seconds per point")
    parser.add_argument("--seconds", type=int, default=3, help="iperf3 duration per path")
    parser.add_argument("--bulk-rounds", type=int, default=2, help="interleaved iperf3 rounds")
    parser.add_argument("--out", default=str(default_out("native_paths")), help="results folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result: dict = {
        "config": inputs_of(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "serial": {},
        "load": {},
    }
    procs = Processes()
    # the client runs on CPU 0 with the app
    with on_cpus(0), tempfile.TemporaryDirectory(prefix="pp-np-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        try:
            uds_echo = workdir / "echo.sock"
            tcp_echo = peers.echo_server(procs, 0).ready().port
            peers.echo_server(procs, 0, listen=f"unix:{uds_echo}")
            wait_path(uds_echo)
            app = {"tcp": f"127.0.0.1:{tcp_echo}", "uds": f"unix:{uds_echo}"}
            proxies = {
                name: Proxy(procs, workdir, name, app[transport], extra)
                for name, (transport, extra) in VARIANTS.items()
            }
            time.sleep(0.5)  # notify calibration done before anything is measured
            total_points = len(SIZES) * (len(proxies) + 1) * 2
            done = 0
            for mode in ("serial", "load"):
                for running in proxies.values():
                    move_to_cpu([running.pid], 0 if mode == "serial" else 1)
                for size in SIZES:
                    count = max(100, min(args.messages, (64 << 20) // size))
                    row = result[mode].setdefault(str(size), {})
                    targets: dict[str, tuple[str, Proxy | None]] = {"direct": (app["tcp"], None)}
                    targets.update({n: (f"127.0.0.1:{p.port}", p) for n, p in proxies.items()})
                    for name, (address, proxy) in targets.items():
                        if mode == "serial":
                            run = lambda a=address, s=size, c=count: serial(a, s, c)  # noqa: E731
                        else:
                            run = lambda a=address, s=size, c=count: load(  # noqa: E731
                                a, s, args.point_seconds, c * 4
                            )
                        row[name] = measured(proxy, run)
                        done += 1
                    base = row["direct"]["p50_us"]
                    for values in row.values():
                        values["added_p50_us"] = values["p50_us"] - base
                    print(
                        f"  {mode} {size} B done ({done}/{total_points}, "
                        f"{time.monotonic() - started:.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
            procs.stop_all()
            procs = Processes()
            result["bulk_gbps"] = bulk(procs, workdir, args.seconds, args.bulk_rounds)
        finally:
            procs.stop_all()
    result["elapsed_s"] = time.monotonic() - started
    result["summary"] = summarize_targets(result)
    publish(args.out, result, report(result), args)
    return 0


def bulk(procs: Processes, workdir: Path, seconds: int, rounds: int) -> dict:
    """Best of `rounds` interleaved iperf3 runs per path (best-of resists a busy neighbour)."""
    if not shutil.which("iperf3"):
        return {}
    server = peers.iperf3_server(procs, 0).ready().port
    ports = {"direct": server}
    pids: dict[str, int] = {}
    nginx = start_nginx(procs, workdir, server, 1)
    if nginx is not None:
        ports["nginx stream"], pids["nginx stream"] = nginx.port, nginx.pid
    if shutil.which("haproxy"):
        ha = peers.haproxy(procs, workdir, server, 1, mode="tcp").ready()
        ports["haproxy"], pids["haproxy"] = ha.port, ha.pid
    for name, extra in (
        ("pyproxy copy", {}),
        ("pyproxy splice", {"relay": "splice"}),
        ("pyproxy splice 256K pipe", {"relay": "splice", "buffer_size": 262144}),
        ("pyproxy zerocopy", {"write": "zerocopy"}),
    ):
        proxy = Proxy(procs, workdir, name.replace(" ", "-"), f"127.0.0.1:{server}", extra)
        ports[name], pids[name] = proxy.port, proxy.pid
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in ports}
    for r in range(rounds):
        for name, port in ports.items():
            pid = pids.get(name)
            cpu0 = cpu_seconds([pid]) if pid else 0.0
            gbps = iperf3(port, seconds)
            if gbps is not None:
                gb = gbps * seconds / 8
                cpu = (cpu_seconds([pid]) - cpu0) / gb if pid else None
                runs[name].append((gbps, cpu))
        print(f"  bulk round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    out = {}
    for name, values in runs.items():
        if values:
            gbps, cpu = max(values, key=lambda v: v[0])
            out[name] = {"gbps": gbps, "cpu_s_per_gb": cpu}
    return out


def summarize_targets(result: dict) -> dict:
    """The issue's targets, computed from the measurements (ratios, not judgements)."""
    s100 = result["serial"]["100"]
    out = {
        "uds_ipc_drop_100B": 1 - s100["uds"]["ipc_us_per_msg"] / s100["tcp"]["ipc_us_per_msg"],
        "uds_ipc_drop_by_size": {
            size: 1 - row["uds"]["ipc_us_per_msg"] / row["tcp"]["ipc_us_per_msg"]
            for size, row in result["serial"].items()
        },
        "uds_added_p50_change_us_100B": s100["uds"]["added_p50_us"] - s100["tcp"]["added_p50_us"],
        "zerocopy_cpu_ratio_by_size": {
            size: row["tcp-zerocopy"]["proxy_cpu_us_per_msg"] / row["tcp"]["proxy_cpu_us_per_msg"]
            for size, row in result["load"].items()
        },
    }
    wins = [s for s, r in out["zerocopy_cpu_ratio_by_size"].items() if r < 1.0]
    out["zerocopy_crossover_bytes"] = int(min(wins, key=int)) if wins else None
    bulk_ = result.get("bulk_gbps", {})
    nginx = bulk_.get("nginx stream")
    for name in ("pyproxy splice", "pyproxy splice 256K pipe", "pyproxy copy"):
        if bulk_.get(name) and nginx:
            out[f"{name} / nginx stream bulk"] = bulk_[name]["gbps"] / nginx["gbps"]
    copy, splice = bulk_.get("pyproxy copy"), bulk_.get("pyproxy splice")
    if copy and splice and copy["cpu_s_per_gb"]:
        out["splice / copy CPU per GB"] = splice["cpu_s_per_gb"] / copy["cpu_s_per_gb"]
    return out


def report(result: dict) -> str:
    lines = []
    for mode in ("serial", "load"):
        lines.append(
            f"\n**{mode}** ({'1 outstanding message' if mode == 'serial' else f'{LOAD_CONNECTIONS} connections'})\n"
        )
        lines.append(
            "| size | path | p50 µs | added p50 µs | msgs/s | proxy CPU µs/msg | ipc µs/msg |"
        )
        lines.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for size, row in result[mode].items():
            for name, v in row.items():
                cpu = v.get("proxy_cpu_us_per_msg")
                ipc = v.get("ipc_us_per_msg")
                lines.append(
                    f"| {size} | {name} | {v['p50_us']:.1f} | {v['added_p50_us']:.1f} | "
                    f"{v['msgs_per_s']:.0f} | {'' if cpu is None else f'{cpu:.1f}'} | "
                    f"{'' if ipc is None else f'{ipc:.2f}'} |"
                )
    if result.get("bulk_gbps"):
        lines.append("\n| bulk (iperf3, TCP) | Gbit/s | CPU s per GB |\n| --- | ---: | ---: |")
        for name, v in result["bulk_gbps"].items():
            cpu = v["cpu_s_per_gb"]
            lines.append(f"| {name} | {v['gbps']:.2f} | {'' if cpu is None else f'{cpu:.3f}'} |")
    s = result["summary"]
    lines.append(
        f"\nUDS ipc stage per message at 100 B: {s['uds_ipc_drop_100B'] * 100:+.0f}% drop "
        f"(target ≥ 40%); added p50 change with UDS: {s['uds_added_p50_change_us_100B']:+.1f} µs"
    )
    lines.append(
        "zerocopy/copy proxy CPU per message under load: "
        + ", ".join(f"{k} B {v:.2f}×" for k, v in s["zerocopy_cpu_ratio_by_size"].items())
        + f"; crossover: {s['zerocopy_crossover_bytes'] or 'none on this host'}"
    )
    for key, value in s.items():
        if " / " in key:
            lines.append(f"{key}: {value:.2f}×")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
