"""`pyproxy bench profile`: measure the sidecar per mode, IPC backend and filter, fit its cost models.

For each configuration pyproxy runs in front of an echo upstream of its
protocol. Per message size, the built-in driver measures round trips at one
outstanding request directly and through the proxy (latency), then paced at
25/50/75/100 % of the one-connection maximum rate (CPU). The stage clock's
deltas give each stage's ns per exchange and per second; /proc gives the
proxy's CPU and the client its latency, so every model is fitted twice: from
inside (per stage) and from outside (whole sidecar). The profile is written as
JSON keyed by platform, with the raw points and each fit's R².

Two settings: `loopback` runs the proxy, the echo and the driver on the host's
loopback; `pods` runs them as the validation's application runs: the echo in
a network-namespace pod whose traffic iptables redirects to its sidecar (uid
1337, the inbound capture listener), the direct echo in a pod without one,
and the driver as a process in a third, client pod, across a bridge. The
profile records its setting, and `predict` and `validate` price sidecars of
one setting only with a profile of that setting.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyproxy.bench.driver import EXCHANGERS, GRPC_CALLER, Exchanger, wait_ready
from pyproxy.bench.filter_configs import filter_entry
from pyproxy.bench.model import (
    HOP_PREFIX,
    LOOPBACK,
    PODS,
    SETTINGS,
    Handoff,
    IdleCurve,
    Linear,
    Profile,
    StageModel,
    current_platform,
    fit_app_cpu,
    fit_busy_share,
    fit_cpu,
    fit_handoff,
    fit_idle_curve,
    fit_latency,
    fit_untimed_cpu,
    r_squared,
)
from pyproxy.bench.peers import pyproxy_mode
from pyproxy.bench.pod_driver import Pair, PodPair
from pyproxy.bench.pod_echo import admin_get
from pyproxy.bench.pod_sidecar import start_captured_sidecar
from pyproxy.bench.procs import (
    Processes,
    cpu_ns,
    free_port,
    move_to_cpu,
    on_cpus,
    shield,
    tree_pids,
    wait_port,
)
from pyproxy.bench.tcp_echo import get_json
from pyproxy.iptables.netns import Pod, missing_capabilities, pods

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (100, 1024, 2048, 4096, 8192, 16384)
LOADS = (0.25, 0.5, 0.75, 1.0)
# Paced rates of the idle curve: where applications run, far below one connection's maximum.
IDLE_RATES = (100, 300, 1000, 3000)
IDLE_SAMPLES = 150
IDLE_PASSES = 3
# The echo's port in its pod (the capture redirects it to the sidecar in the meshed pod).
POD_ECHO_PORT = 8080
# How many sidecars take turns when the profile measures a setup's busy share (busy_points).
BUSY_TURNS = 8
BUSY_ROUNDS = 3
BUSY_WARMUP = 100


@dataclass(frozen=True, slots=True)
class Setup:
    """One proxy configuration to profile."""

    name: str
    mode: str
    ipc: str = "tcp"
    # one filter: its model is what it adds to the mode's; several: the setup is priced as a
    # whole (`Profile.modes[name]`), for sidecars with exactly those filters
    filters: tuple[str, ...] = ()
    # pods only: a whole hop, the driver's pod captured too, so a request crosses the client
    # pod's sidecar (outbound) and the echo pod's (inbound), as a call between two meshed apps
    hop: bool = False

    @property
    def filter_type(self) -> str | None:
        return self.filters[0] if len(self.filters) == 1 and not self.hop else None


def hop_setup(setup: Setup) -> Setup:
    """The hop through two sidecars of `setup` (`hop:NAME`, priced whole by `predict`)."""
    return Setup(f"{HOP_PREFIX}{setup.name}", setup.mode, setup.ipc, setup.filters, hop=True)


def setup_for(mode: str, filters: Sequence[str] = ()) -> Setup:
    """The setup of a sidecar in `mode` with these filters, named as `predict` looks it up."""
    return Setup("+".join((mode, *filters)), mode, filters=tuple(filters))


def setups(modes: list[str], ipcs: list[str], filters: list[str]) -> list[Setup]:
    out = [Setup(mode, mode) for mode in modes]
    # The IPC backend is the app-facing (upstream) socket; TCP mode isolates it best.
    out += [Setup(f"tcp+ipc:{ipc}", "tcp", ipc=ipc) for ipc in ipcs if ipc != "tcp"]
    out += [setup_for("http", [kind]) for kind in filters]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=LOOPBACK,
        help="loopback: proxy, echo and driver on the host's loopback; pods: the echo in a pod "
        "behind iptables capture and its sidecar, the driver in a client pod, as `validate` runs "
        "the application (root)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the proxy on CPU 1, the echo upstream and the driver on CPU 0 (as validate --pin)",
    )
    parser.add_argument(
        "--modes", default="tcp,http,http2,grpc", help="comma-separated: tcp, http, http2, grpc"
    )
    parser.add_argument("--ipc", default="tcp,unix", help="IPC backends (app-facing socket)")
    parser.add_argument(
        "--filters", default="fault,ratelimit", help="filter types, each profiled in HTTP mode"
    )
    parser.add_argument(
        "--echo-work-us",
        type=float,
        default=0.0,
        help="the echoes spin this long before each answer (the work of the calls to "
        "price), so the sidecar's CPU idles between a request and its answer as it does there",
    )
    parser.add_argument(
        "--hops",
        action="store_true",
        help="pods: also measure each setup as a whole hop, the driver's pod captured by a "
        "sidecar of the same setup (what a call between two meshed apps crosses)",
    )
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message sizes, bytes")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measured point")
    add_busy_option(parser)
    parser.add_argument(
        "--idle-rates",
        default=",".join(f"{r:g}" for r in IDLE_RATES),
        help="paced rates (/s) of the idle curve, at the smallest size ('' for none)",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results/profile-<time>)"
    )


def add_busy_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--busy-turns",
        type=int,
        default=BUSY_TURNS,
        help="sidecars taking turns on one CPU when each setup's busy share is measured, on "
        "loopback (how much of its idle curve a pass pays after waiting on a busy CPU); 0: none",
    )


def _stages_delta(after: dict, before: dict) -> dict[str, int]:
    return {
        stage: values["ns"] - before["stages"].get(stage, {"ns": 0})["ns"]
        for stage, values in after["stages"].items()
    }


class LoopbackTarget:
    """A running proxy + echo upstream pair for one setup."""

    def __init__(
        self,
        procs: Processes,
        setup: Setup,
        workdir: Path,
        pinned: bool = False,
        work_us: float = 0.0,
    ) -> None:
        self.setup, self.work_us = setup, work_us
        protocol = setup.mode
        if setup.ipc == "unix":
            upstream = f"unix:{workdir}/echo-{setup.name.replace(':', '_')}.sock"
        else:
            upstream = f"127.0.0.1:{free_port()}"
        echo = procs.start([sys.executable, "-m", "pyproxy.bench.echo_server", "--listen", upstream,
                            "--protocol", protocol, "--work-us", str(work_us)])  # fmt: skip
        listen, self.admin = free_port(), free_port()
        mode, mode_flags = pyproxy_mode(setup.mode)
        argv = [sys.executable, "-m", "pyproxy", "run", "--mode", mode,
                "--listen", f"127.0.0.1:{listen}", "--upstream", upstream,
                "--admin", f"127.0.0.1:{self.admin}", "--log-level", "warning", *mode_flags]  # fmt: skip
        for kind in setup.filters:
            entry = filter_entry(kind, workdir, f"{setup.name}-{kind}")
            argv += ["--filter", f"{entry['name']}={json.dumps(entry['config'])}"]
        self.proc = procs.start(argv)
        wait_port(self.admin, timeout=30)  # a loaded machine starts workers slowly
        self.direct, self.proxied = upstream, f"127.0.0.1:{listen}"
        # one echo answers both paths: what the proxy adds to it cannot be told apart
        self.app_pids: dict[str, list[int]] = {}
        wait_ready(protocol, self.direct)
        wait_ready(protocol, self.proxied)
        self.pids = tree_pids(self.proc.pid)
        if pinned:
            # as `validate --pin` places a pod's processes: the proxy alone on CPU 1, the
            # app side (here the echo upstream and the driver) on CPU 0
            move_to_cpu(tree_pids(echo.pid) + [os.getpid()], 0)
            move_to_cpu(self.pids, 1)

    def stats(self) -> dict:
        return get_json(f"http://127.0.0.1:{self.admin}/stats?format=json")["listeners"]["main"]

    def pair(self, size: int) -> Pair:
        return Pair(self.setup.mode, self.direct, self.proxied, size)


class PodTarget:
    """One setup in the pods setting: the echo in pod `mesh` behind its captured sidecar, the
    same echo in pod `plain` without one, the driver a process in pod `client`."""

    ROLES = ("client", "plain", "mesh")

    def __init__(
        self,
        made: dict[str, Pod],
        setup: Setup,
        workdir: Path,
        pinned: bool,
        work_us: float = 0.0,
        shielded: bool = False,
    ) -> None:
        if setup.ipc != "tcp":
            raise RuntimeError("in pods the app reaches its sidecar through the capture, over TCP")
        self.setup, self.pinned, self.work_us = setup, pinned, work_us
        self.shielded = shielded
        self.client, self.mesh = made["client"], made["mesh"]
        # With work, the sidecar's CPU idles between a request and its answer as it does
        # while an application works; both echoes spin it, so the direct path pays it too.
        argv = [sys.executable, "-m", "pyproxy.bench.echo_server", "--work-us", str(work_us),
                "--listen", f"0.0.0.0:{POD_ECHO_PORT}", "--protocol", setup.mode]  # fmt: skip
        self.echoes = [made[role].popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for role in ("plain", "mesh")]  # fmt: skip
        mode, flags = pyproxy_mode(setup.mode)
        self.sidecar = start_captured_sidecar(self.mesh, mode, setup.filters, workdir, flags)
        self.sidecars = [self.sidecar]
        if setup.hop:
            # the driver's pod meshed too, except for its way to the plain echo (the direct path)
            plain = ["--exclude-outbound-cidrs", f"{made['plain'].ipv4}/32"]
            self.sidecars.append(start_captured_sidecar(self.client, mode, setup.filters, workdir,
                                                        flags, plain))  # fmt: skip
        self.direct = f"{made['plain'].ipv4}:{POD_ECHO_PORT}"
        self.proxied = f"{self.mesh.ipv4}:{POD_ECHO_PORT}"
        self.pids: list[int] = []
        self.app_pids: dict[str, list[int]] = {}  # each path's echo, once they have answered

    def stats(self) -> dict:
        """The stage clock of the listeners the proxied exchanges cross: the echo pod's inbound
        one, and for a hop also the client pod's outbound one (their stages added)."""
        inbound = json.loads(admin_get(self.mesh, "/stats?format=json"))["listeners"]["inbound"]
        if not self.setup.hop:
            return inbound
        outbound = json.loads(admin_get(self.client, "/stats?format=json"))["listeners"]["outbound"]
        names = inbound["stages"].keys() | outbound["stages"].keys()
        reads = {k: sum(side.get("lane_reads", {}).get(k, 0) for side in (inbound, outbound))
                 for k in ("all", "whole")}  # fmt: skip
        return {"stages": {s: {k: sum(side["stages"].get(s, {}).get(k, 0)
                                      for side in (inbound, outbound)) for k in ("ns", "events")}
                           for s in names},
                "lane_reads": reads}  # fmt: skip

    def pair(self, size: int) -> PodPair:
        pair = PodPair(self.client, driver_protocol(self.setup), self.direct, self.proxied, size)
        # once the sidecars have answered, their workers have forked: their trees are complete
        self.pids = [pid for root in self.sidecars for pid in tree_pids(root)]
        self.app_pids = {role: tree_pids(proc.pid)
                         for role, proc in zip(("plain", "mesh"), self.echoes, strict=True)}  # fmt: skip
        if self.pinned:
            # as `validate --pin` places a pod's processes: the sidecar alone on CPU 1, the
            # apps (the echoes) and the load (the driver) on CPU 0
            echoes = [pid for pids in self.app_pids.values() for pid in pids]
            move_to_cpu(echoes + [pair.pid], 0)
            move_to_cpu(self.pids, 1)
            if self.shielded:  # as `validate --pin` shields the application's processes
                shield(echoes + [pair.pid] + self.pids)
        return pair


def driver_protocol(setup: Setup) -> str:
    """The client a setup is driven with: a whole gRPC hop stands for one meshed service
    calling another, so it is driven as the validation app's services call (GRPC_CALLER); a
    single pass stands for the load's call into the first service, driven as the load calls."""
    return GRPC_CALLER if setup.hop and setup.mode == "grpc" else setup.mode


def _open_target(
    stack: contextlib.ExitStack,
    setting: str,
    setup: Setup,
    workdir: Path,
    pinned: bool,
    work_us: float = 0.0,
) -> LoopbackTarget | PodTarget:
    """The setup's running proxy and echoes in `setting`, torn down when `stack` closes."""
    if setting == PODS:
        made = stack.enter_context(pods(PodTarget.ROLES, ipv6_subnet=None))
        # pinned in pods, shielded as `validate --pin` shields its processes
        return PodTarget(made, setup, workdir, pinned, work_us, shielded=pinned)
    procs = Processes()
    stack.callback(procs.stop_all)
    return LoopbackTarget(procs, setup, workdir, pinned, work_us)


def measure_size(
    target: LoopbackTarget | PodTarget,
    size: int,
    seconds: float,
    warmup: int,
    idle_rates: Sequence[float] = (),
) -> list[dict]:
    """The latency point and the CPU points of one setup at one message size; with `idle_rates`,
    also the paced points its `IdleCurve` is built from. The proxy's CPU is read inside the
    stats reads: the admin server that answers them runs in the proxy."""
    base = {
        "setup": target.setup.name,
        "size": size,
        "echo_work_us": target.work_us,
    }
    pair = target.pair(size)
    try:
        before = target.stats()
        cpu0 = cpu_ns(target.pids)
        apps0 = {role: cpu_ns(pids) for role, pids in target.app_pids.items()}
        # Alternating exchanges: direct and proxied see the same machine at the same moments.
        direct_rtts, rtts, wall = pair.paired(seconds, warmup=warmup)
        cpu = cpu_ns(target.pids) - cpu0
        # each path's echo answered its own exchanges
        answered = {"plain": len(direct_rtts) + warmup, "mesh": len(rtts) + warmup}
        apps = {role: (cpu_ns(target.app_pids[role]) - ns) / answered[role]
                for role, ns in apps0.items()}  # fmt: skip
        after = target.stats()
        stages = _stages_delta(after, before)
        exchanges = len(rtts) + warmup
        # the gRPC lane's reads a proxied exchange, all and taken whole in C (see counters.py)
        reads = {k: (after.get("lane_reads", {}).get(k, 0) - before.get("lane_reads", {}).get(k, 0))
                 / exchanges for k in ("all", "whole")}  # fmt: skip
        # and each stage's events a proxied exchange (reads, parses, writes), as validate records
        events = {s: (v.get("events", 0) - before["stages"].get(s, {}).get("events", 0)) / exchanges
                  for s, v in after["stages"].items()}  # fmt: skip
        points = [
            base | {
                "kind": "latency",
                "exchanges": len(rtts),
                "direct_p50_ns": statistics.median(direct_rtts),
                "proxy_p50_ns": statistics.median(rtts),
                "proxy_cpu_ns_per_exchange": cpu / exchanges,
                "rate": len(rtts) / wall,  # what the proxy saw: every other exchange
                "stages_ns": {k: v / exchanges for k, v in stages.items()},
                "stage_events": events,
            } | ({"lane_reads": reads} if reads["all"] else {})
            | ({"app_cpu_ns": apps} if apps else {})
        ]  # fmt: skip
        max_rate = 1e9 / statistics.fmean(rtts)
        for load in LOADS:
            before = target.stats()
            cpu0 = cpu_ns(target.pids)
            done, wall = pair.paced(seconds, load * max_rate)
            cpu = cpu_ns(target.pids) - cpu0
            stages = _stages_delta(target.stats(), before)
            points.append(
                base | {
                    "kind": "cpu",
                    "load": load,
                    "rate": done / wall,
                    "proxy_cpu_ns_per_s": cpu / wall,
                    "stages_ns_per_s": {k: v / wall for k, v in stages.items()},
                }
            )  # fmt: skip
        points += _idle_points(target, pair, base, seconds, idle_rates, max_rate)
    finally:
        pair.close()
    return points


def _idle_points(
    target: LoopbackTarget | PodTarget,
    pair: Pair | PodPair,
    base: dict,
    seconds: float,
    rates: Sequence[float],
    max_rate: float,
) -> list[dict]:
    """Paced points below the closed-loop rate, each one the median of IDLE_PASSES passes over
    all the rates in turn: the machine's other load comes in bursts of seconds, and one burst
    then spoils one pass of one rate, not the point."""
    rates = [r for r in rates if r < max_rate]
    passes: dict[float, list[tuple[float, float, float, dict[str, float]]]] = {r: [] for r in rates}
    for _ in range(IDLE_PASSES):
        for rate in rates:
            before = target.stats()
            cpu0 = cpu_ns(target.pids)
            # At least IDLE_SAMPLES exchanges over the passes, however low the rate.
            wall = max(seconds, IDLE_SAMPLES / rate) / IDLE_PASSES
            paced_direct, paced, _ = pair.paired(wall, rate=rate)
            cpu = cpu_ns(target.pids) - cpu0
            # The stage clock too: whether a paced exchange's extra cost is inside the timed
            # stages (cold caches) or outside them (waking the processes).
            stages = _stages_delta(target.stats(), before)
            passes[rate].append((statistics.median(paced_direct), statistics.median(paced),
                                 cpu / len(paced),
                                 {k: v / len(paced) for k, v in stages.items()}))  # fmt: skip
    out = []
    for rate, runs in passes.items():
        middle = sorted(runs, key=lambda run: run[1] - run[0])[len(runs) // 2]
        out.append(
            base | {
                "kind": "idle",
                "rate": rate,
                "paced_rate": rate,
                "direct_p50_ns": middle[0],
                "proxy_p50_ns": middle[1],
                "proxy_cpu_ns_per_exchange": statistics.median(run[2] for run in runs),
                "passes_overhead_ns": [run[1] - run[0] for run in runs],
                "stages_ns": _median_of([run[3] for run in runs]),
            }
        )  # fmt: skip
    return out


def busy_calls(seconds: float) -> int:
    """Calls per busy measurement for a profile given `seconds` per point."""
    return max(20, int(2000 * seconds))


def take_turns(
    targets: Sequence[LoopbackTarget],
    exchangers: Sequence[Exchanger],
    calls: int,
    period_s: float | None = None,
) -> dict:
    """`calls` calls over the targets in turn, back to back or one every `period_s`: per call,
    their sidecars' stage clock and CPU (ns), the round trip (ns, the mean), and how long each
    sidecar waited between its calls (ns)."""
    pids = [pid for target in targets for pid in target.pids]

    def stage_ns() -> int:
        return sum(s["ns"] for target in targets for s in target.stats()["stages"].values())

    period_ns = None if period_s is None else int(period_s * 1e9)
    stages0, cpu0 = stage_ns(), cpu_ns(pids)
    start = due = time.perf_counter_ns()
    busy = 0
    for i in range(calls):
        sent = time.perf_counter_ns()
        exchangers[i % len(exchangers)].exchange()
        busy += time.perf_counter_ns() - sent
        if period_ns is not None:
            due += period_ns
            if (wait := due - time.perf_counter_ns()) > 0:
                time.sleep(wait / 1e9)
    wall = time.perf_counter_ns() - start
    return {
        "stage_ns": (stage_ns() - stages0) / calls,
        "cpu_ns": (cpu_ns(pids) - cpu0) / calls,
        "round_trip_ns": busy / calls,
        "gap_ns": (wall * len(exchangers) - busy) / calls,
    }


def busy_points(
    setup: Setup,
    workdir: Path,
    work_us: float,
    size: int,
    calls: int,
    rounds: int = BUSY_ROUNDS,
    turns: Sequence[int] = (BUSY_TURNS,),
) -> list[dict]:
    """Whether a setup's wake-up cost is its CPU's or its own (`fit_busy_share`): max(turns)
    sidecars of the setup on loopback, alone on CPU 1, each with its echo; the driver (this
    process, for the while) and the echoes on CPU 0. Per round: one sidecar called back to back;
    then, in a shuffled order, for each K in `turns` the first K taking turns back to back (CPU
    1 never idles, yet each sidecar waits while the others pass theirs) and one paced at K of
    its round trips (its CPU idles as long as it waits). One point per K, each figure a list
    over the rounds."""
    points = {k: {"setup": setup.name, "kind": "busy", "size": size, "turns": k}
              for k in turns}  # fmt: skip
    with contextlib.ExitStack() as stack, on_cpus(None):  # the targets pin this process
        procs = Processes()
        stack.callback(procs.stop_all)
        targets = [LoopbackTarget(procs, setup, workdir, pinned=True, work_us=work_us)
                   for _ in range(max(turns))]  # fmt: skip
        exchangers = [EXCHANGERS[driver_protocol(setup)](t.proxied, size) for t in targets]
        for exchanger in exchangers:
            stack.callback(exchanger.close)
            for _ in range(BUSY_WARMUP):
                exchanger.exchange()
        for _ in range(rounds):
            one = take_turns(targets[:1], exchangers[:1], calls)
            for point in points.values():
                _add_round(point, "one", one)
            plan = [(kind, k) for kind in ("turns", "paced") for k in turns]
            random.shuffle(plan)
            for kind, k in plan:
                if kind == "turns":
                    got = take_turns(targets[:k], exchangers[:k], calls)
                else:
                    period = k * one["round_trip_ns"] / 1e9
                    got = take_turns(targets[:1], exchangers[:1], max(1, calls // k), period)
                _add_round(points[k], kind, got)
    return list(points.values())


def _add_round(point: dict, kind: str, figures: dict) -> None:
    for name, value in figures.items():
        point.setdefault(f"{kind}_{name}", []).append(value)


def _median_of(values: list) -> object:
    """The median of numbers, of dicts of numbers (key by key), or of lists (concatenated)."""
    if isinstance(values[0], dict):
        keys = {k for v in values for k in v}
        return {k: statistics.median(v.get(k, 0) for v in values) for k in sorted(keys)}
    if isinstance(values[0], list):
        return [x for v in values for x in v]
    if isinstance(values[0], int | float) and not isinstance(values[0], bool):
        return statistics.median(values)
    return values[0]


def pooled(points: list[dict]) -> list[dict]:
    """Repeated measurements of the same points (a setup measured in several blocks, between
    which the machine's other load came and went) as one point each: every figure the median
    over the blocks (a paced point's passes all kept), so a block that a burst of other work
    struck moves nothing. Points are the same when their setup, kind, size, load (CPU points),
    paced rate (idle points) and turns (busy points) are; `blocks` says how many were
    pooled."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        key = (p["setup"], p["kind"], p["size"], p.get("load"), p.get("paced_rate"), p.get("turns"))
        groups.setdefault(key, []).append(p)
    out = []
    for same in groups.values():
        merged = {k: _median_of([p[k] for p in same if k in p]) for k in same[0]}
        out.append(merged | {"blocks": len(same)})
    return out


def fit_idle(points: list[dict]) -> IdleCurve | None:
    """One setup's IdleCurve: its paced points' latency and CPU beyond its closed-loop point's."""
    paced = [p for p in points if p["kind"] == "idle"]
    if not paced:
        return None
    size = paced[0]["size"]
    [hot] = [p for p in points if p["kind"] == "latency" and p["size"] == size]
    hot_overhead = hot["proxy_p50_ns"] - hot["direct_p50_ns"]
    # how long each point's exchange kept the proxy's CPU busy, for the idle gap before it
    spans = {p["paced_rate"]: p["proxy_p50_ns"] for p in paced} | {hot["rate"]: hot["proxy_p50_ns"]}
    return fit_idle_curve(
        hot["rate"],
        [(p["paced_rate"], p["proxy_p50_ns"] - p["direct_p50_ns"] - hot_overhead,
          p["proxy_cpu_ns_per_exchange"] - hot["proxy_cpu_ns_per_exchange"],
          # the stages' part, where the paced point read the stage clock
          *([sum(p["stages_ns"].values()) - sum(hot["stages_ns"].values())]
            if "stages_ns" in p else [])) for p in paced],
        spans,
    )  # fmt: skip


def fit_setup_handoff(points: list[dict]) -> Handoff | None:
    """One setup's hand-off: per latency point, the client-side added p50 less the stage-clock
    sum per exchange, fitted over the sizes. Measured with `--pin`, it is the cross-CPU wake-ups
    of one sidecar pass placed as in the pods."""
    lat = [p for p in points if p["kind"] == "latency"]
    if not lat:
        return None
    return fit_handoff(
        [p["size"] for p in lat],
        [p["proxy_p50_ns"] - p["direct_p50_ns"] - sum(p["stages_ns"].values()) for p in lat],
    )


def fit_setup_app_cpu(points: list[dict]) -> Linear | None:
    """One setup's CPU added to the app behind its sidecar (`fit_app_cpu`), from the latency
    points that measured both paths' echoes (the pods setting); None elsewhere."""
    lat = [p for p in points if p["kind"] == "latency" and "app_cpu_ns" in p]
    if not lat:
        return None
    return fit_app_cpu([p["size"] for p in lat], [p["app_cpu_ns"]["mesh"] for p in lat],
                       [p["app_cpu_ns"]["plain"] for p in lat])  # fmt: skip


def fit_setup_untimed(points: list[dict]) -> Linear | None:
    """One setup's untimed CPU per exchange: at each CPU point, the proxy's /proc CPU less its
    stage clock's sum, fitted r·(U + s·u) over rates and sizes."""
    cpu = [p for p in points if p["kind"] == "cpu"]
    if not cpu:
        return None
    return fit_untimed_cpu(
        [p["rate"] for p in cpu],
        [p["size"] for p in cpu],
        [p["proxy_cpu_ns_per_s"] for p in cpu],
        [sum(p["stages_ns_per_s"].values()) for p in cpu],
    )


def fit_setup(points: list[dict]) -> tuple[dict[str, StageModel], StageModel]:
    """Per-stage models (stage clock) and the whole sidecar's model (external measurement)."""
    lat = [p for p in points if p["kind"] == "latency"]
    cpu = [p for p in points if p["kind"] == "cpu"]
    stages = sorted(
        {s for p in lat for s in p["stages_ns"]} | {s for p in cpu for s in p["stages_ns_per_s"]}
    )
    models = {}
    for stage in stages:
        latency = (
            fit_latency([p["size"] for p in lat], [p["stages_ns"].get(stage, 0) for p in lat])
            if lat
            else Linear(0, 0)
        )
        cost = (
            fit_cpu([p["rate"] for p in cpu], [p["size"] for p in cpu], [p["stages_ns_per_s"].get(stage, 0) for p in cpu])
            if cpu else Linear(0, 0)
        )  # fmt: skip
        models[stage] = StageModel(latency, cost)
    ext_latency = (
        fit_latency([p["size"] for p in lat], [p["proxy_p50_ns"] - p["direct_p50_ns"] for p in lat])
        if lat else Linear(0, 0)
    )  # fmt: skip
    ext_cpu = (
        fit_cpu([p["rate"] for p in cpu], [p["size"] for p in cpu], [p["proxy_cpu_ns_per_s"] for p in cpu])
        if cpu else Linear(0, 0)
    )  # fmt: skip
    return models, StageModel(ext_latency, ext_cpu)


def build_profile(
    plan: list[Setup], points: list[dict], platform: dict, setting: str = LOOPBACK
) -> Profile:
    modes: dict[str, dict[str, StageModel]] = {}
    ipc: dict[str, StageModel] = {}
    filters: dict[str, StageModel] = {}
    external: dict[str, StageModel] = {}
    idle: dict[str, IdleCurve] = {}
    handoff: dict[str, Handoff] = {}
    untimed: dict[str, Linear] = {}
    busy: dict[str, float] = {}
    app_cpu: dict[str, Linear] = {}
    for setup in plan:
        mine = [p for p in points if p["setup"] == setup.name]
        if not mine:
            continue  # interrupted before this setup ran
        stages, outside = fit_setup(mine)
        external[setup.name] = outside
        if (curve := fit_idle(mine)) is not None:
            idle[setup.name] = curve
        if (gap := fit_setup_handoff(mine)) is not None:
            handoff[setup.name] = gap
        if (unseen := fit_setup_untimed(mine)) is not None:
            untimed[setup.name] = unseen
        if (share := fit_busy_share(mine)) is not None:
            busy[setup.name] = share
        if (added := fit_setup_app_cpu(mine)) is not None:
            app_cpu[setup.name] = added
        if setup.hop or len(setup.filters) > 1:
            modes[setup.name] = stages  # a hop, or this combination of filters: priced whole
        elif setup.filter_type:
            own = stages[f"filter:{setup.filter_type}"]
            plain = modes.get(setup.mode)
            # A filter costs all its path costs beyond the unfiltered one: its own stage and
            # what it changes in the others (a filtered request leaves the native fast path).
            filters[setup.filter_type] = (
                _sum(stages.values()).minus(_sum(plain.values())) if plain else own
            )
        elif setup.ipc != "tcp":
            ipc[setup.ipc] = stages["ipc"]
        else:
            modes[setup.mode] = stages
    return Profile(platform, modes, ipc, filters, external, points, idle, handoff, untimed, setting,
                   busy, app_cpu)  # fmt: skip


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; the run is the same without it
        return None
    return tqdm(total=total, unit="point", file=sys.stderr, dynamic_ncols=True)


def _git() -> str:
    run = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)  # fmt: skip
    return run.stdout.strip()


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m]
    plan = setups(
        modes, [i for i in args.ipc.split(",") if i], [f for f in args.filters.split(",") if f]
    )
    if args.hops:
        if args.setting != PODS:
            print("pyproxy bench profile: --hops needs --setting pods", file=sys.stderr)
            return 2
        plan += [hop_setup(s) for s in plan if s.ipc == "tcp"]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    idle_rates = [float(r) for r in args.idle_rates.split(",") if r]
    if args.setting == PODS and (missing := missing_capabilities()):
        print(f"pyproxy bench profile: pods need {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / time.strftime("profile-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    platform = current_platform(
        backends=sorted({s.ipc for s in plan}), codecs=sorted({s.mode for s in plan})
    )
    (out / "inputs.json").write_text(json.dumps({
        "argv": sys.argv, "setups": [s.name for s in plan], "sizes": sizes,
        "seconds_per_point": args.seconds, "loads": LOADS, "pin": args.pin,
        "echo_work_us": args.echo_work_us,
        "setting": args.setting,
    }, indent=2) + "\n")  # fmt: skip
    (out / "environment.json").write_text(json.dumps(platform | {"git": _git()}, indent=2) + "\n")
    warmup = max(5, min(50, int(args.seconds * 100)))
    points: list[dict] = []
    skipped: dict[str, str] = {}
    interrupted = False
    bar = _progress(len(plan) * len(sizes))
    with tempfile.TemporaryDirectory(prefix="pyproxy-profile-") as tmp:
        try:
            for setup in plan:
                stack = contextlib.ExitStack()
                try:
                    target = _open_target(
                        stack, args.setting, setup, Path(tmp), args.pin, args.echo_work_us
                    )
                    for size in sizes:
                        if bar is not None:
                            bar.set_description(f"{setup.name} {size} B")
                        idle = idle_rates if size == min(sizes) else ()
                        points += measure_size(target, size, args.seconds, warmup, idle)
                        if bar is not None:
                            bar.update()
                    if args.busy_turns and not setup.hop and setup.ipc == "tcp":
                        points += busy_points(setup, Path(tmp), args.echo_work_us, min(sizes),
                                              busy_calls(args.seconds), turns=(args.busy_turns,))  # fmt: skip
                except (RuntimeError, OSError, ConnectionError, subprocess.SubprocessError) as exc:
                    skipped[setup.name] = str(exc)
                    print(f"pyproxy bench profile: {setup.name} skipped: {exc}", file=sys.stderr)
                finally:
                    stack.close()
        except KeyboardInterrupt:
            interrupted = True
            print("pyproxy bench profile: interrupted; fitting what was measured", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
    profile = build_profile(plan, points, platform, args.setting)
    profile.save(out / "profile.json")
    _write_points_csv(points, out / "points.csv")
    if points:
        write_plots(profile, out)
    summary = {"interrupted": interrupted, "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(stage_table(profile))
    print(models_table(profile))
    print(f"\nsetting: {profile.setting}; results: {out}")
    return 130 if interrupted else 0


def write_plots(profile: Profile, out: Path) -> list[Path]:
    """Stage breakdown per setup (smallest size) and external latency vs size with its fitted line."""
    from pyproxy.bench.plots import fitted_lines, stage_bars

    latency = [p for p in profile.points if p["kind"] == "latency"]
    smallest = min(p["size"] for p in latency)
    bars = {
        p["setup"]: {k: v / 1000 for k, v in p["stages_ns"].items() if v}
        for p in latency
        if p["size"] == smallest
    }
    points: dict[str, list[tuple[float, float]]] = {}
    for p in latency:
        points.setdefault(p["setup"], []).append(
            (p["size"], (p["proxy_p50_ns"] - p["direct_p50_ns"]) / 1000)
        )
    lines = {
        name: (m.latency.base / 1000, m.latency.per_byte / 1000)
        for name, m in profile.external.items()
    }
    cpu = [p for p in profile.points if p["kind"] == "cpu" and p["size"] == smallest]
    cpu_points: dict[str, list[tuple[float, float]]] = {}
    for p in cpu:
        cpu_points.setdefault(p["setup"], []).append((p["rate"], p["proxy_cpu_ns_per_s"] / 1e9))
    cpu_lines = {name: (0.0, m.cpu.at(smallest) / 1e9) for name, m in profile.external.items()}
    return [
        stage_bars(bars, out / "stages.png", ylabel=f"stage clock µs per exchange ({smallest} B)"),
        fitted_lines(cpu_points, cpu_lines, out / "cpu_vs_rate.png", f"exchanges/s ({smallest} B)", "proxy CPU (cores)"),
        fitted_lines(points, lines, out / "latency_vs_size.png", "message size (B)", "added p50 latency (µs)"),
    ]  # fmt: skip


def _write_points_csv(points: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setup", "kind", "size", "load", "rate", "direct_p50_ns", "proxy_p50_ns",
                         "proxy_cpu_ns_per_s", "stage_clock_total"])  # fmt: skip
        for p in points:
            stage_total = sum((p.get("stages_ns") or p.get("stages_ns_per_s") or {}).values())
            writer.writerow([p["setup"], p["kind"], p["size"], p.get("load", ""), p.get("rate", ""),
                             p.get("direct_p50_ns", ""), p.get("proxy_p50_ns", ""),
                             p.get("proxy_cpu_ns_per_s", ""), stage_total])  # fmt: skip


def stage_table(profile: Profile, size: int | None = None) -> str:
    """Markdown: stage-clock µs per exchange for every setup at one size (measured, not fitted)."""
    latency = [p for p in profile.points if p["kind"] == "latency"]
    if not latency:
        return ""
    size = size if size is not None else min(p["size"] for p in latency)
    at = {p["setup"]: p for p in latency if p["size"] == size}
    stages: list[str] = []
    for p in at.values():
        stages += [s for s, ns in p["stages_ns"].items() if ns and s not in stages]
    lines = [f"stage clock, µs per exchange at {size} B (one outstanding request)", "",
             "| stage | " + " | ".join(at) + " |", "| --- |" + " ---: |" * len(at)]  # fmt: skip
    for stage in stages:
        cells = (f"{p['stages_ns'].get(stage, 0) / 1000:.1f}" for p in at.values())
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    total = (f"**{sum(p['stages_ns'].values()) / 1000:.1f}**" for p in at.values())
    lines.append("| **sum** | " + " | ".join(total) + " |")
    outside = (f"{(p['proxy_p50_ns'] - p['direct_p50_ns']) / 1000:.1f}" for p in at.values())
    lines.append("| added p50, client-side | " + " | ".join(outside) + " |")
    return "\n".join(lines) + "\n"


def models_table(profile: Profile) -> str:
    """Markdown: per configuration and stage, L + s·l and C + s·c with R²."""
    lines = [
        "| setup | stage | L ns | l ns/B | R² | C ns | c ns/B | R² |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(setup: str, stage: str, m: StageModel) -> str:
        la, cp = m.latency, m.cpu
        return (f"| {setup} | {stage} | {la.base:.0f} | {la.per_byte:.3f} | {_r2(la)} "
                f"| {cp.base:.0f} | {cp.per_byte:.3f} | {_r2(cp)} |")  # fmt: skip

    for mode, stages in profile.modes.items():
        for stage, model in stages.items():
            if model.latency.base or model.latency.per_byte:
                lines.append(row(mode, stage, model))
        lines.append(row(mode, "**sum of stages**", _sum(stages.values())))
    for backend, model in profile.ipc.items():
        lines.append(row(f"ipc={backend}", "ipc", model))
    for kind, model in profile.filters.items():
        lines.append(row(f"filter {kind}", f"filter:{kind}", model))
    for setup, model in profile.external.items():
        lines.append(row(setup, "*external*", model))
    if profile.handoff:
        lines += ["", "hand-off per pass (added p50 less the stage-clock sum), fitted over sizes", "",
                  "| setup | L ns | l ns/B | R² | largest residual ns |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for setup, h in profile.handoff.items():
            lines.append(f"| {setup} | {h.latency.base:.0f} | {h.latency.per_byte:.3f} "
                         f"| {_r2(h.latency)} | {h.spread_ns:.0f} |")  # fmt: skip
    if profile.untimed:
        lines += ["", "untimed CPU per exchange (/proc CPU less the stage-clock sum), fitted "
                  "r·(U + s·u) over rates and sizes", "",
                  "| setup | U ns | u ns/B | R² |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for setup, line in profile.untimed.items():
            lines.append(f"| {setup} | {line.base:.0f} | {line.per_byte:.3f} | {_r2(line)} |")
    if profile.idle:
        lines += ["", "idle curve: the cost per exchange beyond the closed loop after the proxy's "
                  "CPU idled (gap) between exchanges paced at a rate; R²: the curve (falling, "
                  "never negative) against the paced points it was made from", "",
                  "| setup | rate /s | idle gap µs | latency µs | of which stages µs | CPU µs "
                  "| R² latency | R² CPU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for setup, curve in profile.idle.items():
            r2_latency, r2_cpu = idle_fit(profile.points, setup, curve)
            gaps = curve.gaps_ns or (float("nan"),) * len(curve.points)
            stages = curve.stage_ns or (float("nan"),) * len(curve.points)
            for (rate, lat, cpu), gap, stage in zip(curve.points, gaps, stages, strict=True):
                lines.append(f"| {setup} | {rate:.0f} | {gap / 1000:.0f} | {lat / 1000:.1f} "
                             f"| {stage / 1000:.1f} | {cpu / 1000:.1f} | {r2_latency:.2f} "
                             f"| {r2_cpu:.2f} |")  # fmt: skip
    return "\n".join(lines)


def idle_fit(points: list[dict], setup: str, curve: IdleCurve) -> tuple[float, float]:
    """R² of the stored idle curve (latency, CPU) against the setup's paced points, each taken as
    its extra cost beyond the closed loop: below 1 where the curve had to pool or clamp them."""
    mine = [p for p in points if p["setup"] == setup]
    paced = [p for p in mine if p["kind"] == "idle"]
    if not paced:
        return float("nan"), float("nan")
    size = paced[0]["size"]
    [hot] = [p for p in mine if p["kind"] == "latency" and p["size"] == size]
    extra = [(p["paced_rate"], p["proxy_p50_ns"] - p["direct_p50_ns"]
              - (hot["proxy_p50_ns"] - hot["direct_p50_ns"]),
              p["proxy_cpu_ns_per_exchange"] - hot["proxy_cpu_ns_per_exchange"])
             for p in paced if p["paced_rate"] < hot["rate"]]  # fmt: skip
    if not extra:
        return float("nan"), float("nan")
    return (r_squared([e[1] for e in extra], [curve.at(e[0])[0] for e in extra]),
            r_squared([e[2] for e in extra], [curve.at(e[0])[1] for e in extra]))  # fmt: skip


def _r2(fit: Linear) -> str:
    return "–" if fit.r2 != fit.r2 else f"{fit.r2:.2f}"  # a sum of fits has no R² of its own


def _sum(models) -> StageModel:
    models = list(models)
    return StageModel(
        Linear(sum(m.latency.base for m in models), sum(m.latency.per_byte for m in models), float("nan")),
        Linear(sum(m.cpu.base for m in models), sum(m.cpu.per_byte for m in models), float("nan")),
    )  # fmt: skip
