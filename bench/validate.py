"""`pyproxy bench validate`: predicted vs measured overhead of a small multi-service application in pods.

The application (`validation_app.py`: services calling each other over
HTTP/1.1 or gRPC, as a chain a → b or a fan-out a → b ∥ c) runs with every
service in its own network-namespace pod, as a mesh runs it, three times at
once on one bridge: without sidecars; with a pyproxy sidecar in every pod
(uid 1337) and the pod's traffic captured by `pyproxy capture apply`
(iptables REDIRECT: outbound → 15001, inbound → 15006); and without
sidecars but exporting OpenTelemetry traces. The load runs in a client pod
outside the mesh (`validation_load.py`): closed-loop rounds (one outstanding
request) alternate between the plain and the meshed app, then both are paced
at fractions of the meshed rate while the sidecars' CPU is read from /proc.

With `--interleave` the profile is measured within each case: the same
echo pods, sidecar and driver as `profile --setting pods`, once for a single
sidecar pass and once for a whole hop (`profile --hops`), in blocks before,
between and after the case's phases, so that the machine's other load, which
comes and goes over minutes, weighs on the profile and on the application
alike; each point is the median over the blocks. It measures echoes, never
the application: the application's figures play no part in its models.

Predicted: `predict` at each measured rate on the same call graph (both
sidecars of each hop: the caller's outbound and the callee's inbound) with
the profile's stage models and with its external (whole-sidecar) models, and
on the call graphs built from the traces the app exported. Each measurement
is also split into its two halves: how far they disagree is the floor under
any prediction's error on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyproxy.bench.callgraph import (
    CallGraph,
    Service,
    graph_from_data,
    graphs_from_traces,
    read_otlp_lines,
)
from pyproxy.bench.model import PODS, Profile, check_platform, check_setting, current_platform
from pyproxy.bench.pod_echo import admin_get
from pyproxy.bench.pod_sidecar import start_captured_sidecar
from pyproxy.bench.predict import HANDOFF_STAGE, IDLE_STAGE, Prediction, WhatIf, predict
from pyproxy.bench.procs import (
    Noise,
    add_halt_poll_option,
    halt_poll_refused,
    halt_polling,
    speed_probe,
)
from pyproxy.bench.profile import (
    IDLE_RATES,
    PodTarget,
    add_busy_option,
    build_profile,
    busy_calls,
    busy_points,
    hop_setup,
    measure_size,
    pooled,
    setup_for,
)
from pyproxy.bench.schedule import PINNED, UNPLACED
from pyproxy.iptables.netns import Pod, missing_capabilities, pods

PY = sys.executable
RESULTS = Path(__file__).resolve().parent / "results"
APP_PORT = 8080
TOPOLOGIES = {
    # service -> (downstream services, parallel?)
    "chain": {"a": (["b"], False), "b": ([], False)},
    "fanout": {"a": (["b", "c"], True), "b": ([], False), "c": ([], False)},
}
# app protocol / sidecar mode (+ filters on every sidecar)
CASES = "http/tcp,http/http,http/http+fault+ratelimit,grpc/grpc"


@dataclass(frozen=True, slots=True)
class Case:
    protocol: str
    mode: str
    filters: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Case:
        protocol, sep, rest = text.partition("/")
        mode, *filters = rest.split("+")
        if not sep or protocol not in ("http", "grpc") or mode not in ("tcp", "http", "grpc"):
            raise ValueError(f"case {text!r}: expected APP/MODE[+FILTER...], APP http|grpc")
        if (protocol, mode) in (("grpc", "http"), ("http", "grpc")):
            raise ValueError(f"case {text!r}: a {mode} sidecar cannot carry a {protocol} app")
        return cls(protocol, mode, tuple(filters))

    @property
    def label(self) -> str:
        return "+".join((self.mode, *self.filters))

    @property
    def text(self) -> str:
        return f"{self.protocol}/{self.label}"


@dataclass
class Deployment:
    entry: str
    sidecar_roots: list[int]
    app_roots: list[int]


def deploy(
    made: dict[str, Pod],
    prefix: str,
    topology: str,
    case: Case,
    sidecars: bool,
    work_us: float,
    workdir: Path,
    trace: Path | None = None,
) -> Deployment:
    """Each service in its pod `prefix+name`, listening on APP_PORT; with sidecars, captured."""
    services = TOPOLOGIES[topology]
    sidecar_roots, app_roots = [], []
    for name, (downstream, parallel) in services.items():
        pod = made[prefix + name]
        if sidecars:
            sidecar_roots.append(start_captured_sidecar(pod, case.mode, case.filters, workdir))
        argv = [PY, "-m", "pyproxy.bench.validation_app", "--protocol", case.protocol,
                "--listen", f"0.0.0.0:{APP_PORT}", "--work-us", str(work_us), "--name", name]  # fmt: skip
        for d in downstream:
            argv += ["--call", f"{made[prefix + d].ipv4}:{APP_PORT}"]
        if parallel:
            argv.append("--parallel")
        if trace is not None:
            argv += ["--trace", str(trace)]
        with open(workdir / f"app-{pod.role}.log", "ab") as log:
            app_roots.append(pod.popen(argv, stdout=log, stderr=subprocess.STDOUT).pid)
    return Deployment(f"{made[prefix + 'a'].ipv4}:{APP_PORT}", sidecar_roots, app_roots)


# what `_captured` reads of each listener's requests: all, taken by the express path, finished in C
LANE_COUNTERS = ("requests", "express_requests", "native_requests")


def _captured(pod: Pod) -> dict:
    """Connections each of the pod's capture listeners accepted (proof the iptables rules steered
    them there), and the ns its stage clock counted over both."""
    listeners = json.loads(admin_get(pod, "/stats?format=json"))["listeners"]
    out = {
        name: listeners[name]["connections_total"]
        for name in ("inbound", "outbound")
        if name in listeners
    }
    out["stage_ns"] = sum(
        stage["ns"]
        for name in ("inbound", "outbound")
        for stage in listeners.get(name, {}).get("stages", {}).values()
    )
    # per listener: its requests, those its express path took and those finished in C (for
    # gRPC, the calls the gRPC lane carried whole): whether the lane carried the pods' calls
    out["lane"] = {
        name: [listeners.get(name, {}).get(k, 0) for k in LANE_COUNTERS]
        for name in ("inbound", "outbound")
    }
    # per listener: the gRPC lane's reads, all and those taken whole in one C call (the rest went
    # on in Python): whether the app's grpcio traffic stays on the lane's fast path
    out["lane_reads"] = {
        name: [listeners.get(name, {}).get("lane_reads", {}).get(k, 0) for k in ("all", "whole")]
        for name in ("inbound", "outbound")
    }
    # per listener and stage: where the pods' passes cost more than the profile's
    out["stages"] = {
        name: {stage: s["ns"] for stage, s in listeners.get(name, {}).get("stages", {}).items()}
        for name in ("inbound", "outbound")
    }
    # and how many times each stage ran (reads, parses, writes): a pass that took its message
    # in more reads or wake-ups than another costs more for that alone
    out["stage_events"] = {
        name: {stage: s["events"] for stage, s in listeners.get(name, {}).get("stages", {}).items()}
        for name in ("inbound", "outbound")
    }
    return out


def graph_for(
    topology: str, case: Case, size: int, rate: float, work_us: float, app_us: float = 0.0
):
    """The topology's call graph; `app_us` is each side of a call's stack CPU (app_own_us):
    the callee's server side of every call, the caller's client side of every call but the
    root's."""
    services = TOPOLOGIES[topology]
    calls = [{"id": "a", "callee": "a", "request": size, "response": size, "rate": rate,
              "work_us": work_us, "app_us": app_us}]  # fmt: skip
    for d in services["a"][0]:
        calls.append({"id": d, "parent": "a", "callee": d, "request": size, "response": size,
                      "group": 0 if services["a"][1] else len(calls), "work_us": work_us,
                      "app_us": app_us, "client_us": app_us})  # fmt: skip
    service = {"mode": case.mode, "filters": list(case.filters)}
    return graph_from_data({"name": f"{topology}/{case.label}", "calls": calls,
                            "services": {s: service for s in services}})  # fmt: skip


def run_case(topology: str, case: Case, args: argparse.Namespace, workdir: Path) -> dict:
    """One application and sidecar setup: its pods, its load, the measured figures and the traces;
    with `--interleave`, also the profile of its sidecars' setup, measured between its phases."""
    names = list(TOPOLOGIES[topology])
    roles = ["client"] + [p + n for p in "pmt" for n in names]
    roles += [r for roles_of in PROFILE_ROLES for r in roles_of.values()] if args.interleave else []
    trace = workdir / f"traces-{topology}-{case.protocol}-{case.label}.jsonl"
    trace.write_text("")
    with pods(roles, ipv6_subnet=None) as made:
        plain = deploy(made, "p", topology, case, False, args.work_us, workdir)
        mesh = deploy(made, "m", topology, case, True, args.work_us, workdir)
        traced = deploy(made, "t", topology, case, False, args.work_us, workdir, trace)
        argv = [PY, "-m", "pyproxy.bench.validation_load", "--protocol", case.protocol,
                "--plain", plain.entry, "--mesh", mesh.entry, "--size", str(args.size),
                "--rounds", str(args.rounds), "--seconds", str(args.seconds),
                "--sidecar-roots", ",".join(map(str, mesh.sidecar_roots)),
                "--mesh-app-roots", ",".join(map(str, mesh.app_roots)),
                "--plain-app-roots", ",".join(map(str, plain.app_roots)),
                "--traced-app-roots", ",".join(map(str, traced.app_roots))] + (["--pin"] if args.pin else []) + (["--shield"] if args.pin and args.shield else [])  # fmt: skip
        tracing = ["--traced", traced.entry, "--traced-requests", str(args.traced_requests)]
        noise = Noise()

        def load(extra: list[str], phases: int) -> dict:
            # each paced round lasts at least ROUND_SAMPLES exchanges: seconds at the lowest rates
            budget = 120 + 3 * args.rounds * phases * max(args.seconds, 2.0)
            return json.loads(made["client"].run(argv + extra, timeout=budget).stdout)

        if not args.interleave:
            measured = load(["--loads", args.loads, *tracing], 1 + len(args.loads.split(",")))
        else:
            measured = _interleaved(made, case, args, workdir, load, tracing, names)
            profile_file = f"profile-{topology}-{case.protocol}-{case.label}.json"
            measured.pop("profile").save(workdir / profile_file)
            measured["profile"] = profile_file
        measured["foreign_cpus"] = noise.cpus()
        measured["captured"] = {n: _captured(made["m" + n]) for n in names}
        for name in names:  # the traced services write the spans they held as they stop
            made["t" + name].stop_processes()
    measured |= {"topology": topology, "case": case.text, "trace": trace.name, "pinned": args.pin,
                 "size": args.size, "work_us": args.work_us}  # fmt: skip
    return measured


# The pods the interleaved profile runs in, beside the application's: one sidecar pass (from
# the application's client pod, outside the mesh, as the root call comes), and a whole hop
# (from a captured client pod of its own).
PROFILE_ROLES = (
    {"client": "client", "plain": "eplain", "mesh": "emesh"},
    {"client": "hclient", "plain": "hplain", "mesh": "hmesh"},
)


def _interleaved(
    made, case: Case, args, workdir: Path, load, tracing: list[str], services: list[str]
) -> dict:
    """The case's phases (closed loop, then each paced load) with a block of the profile of its
    sidecars' setup before, between and after them: the same echo pods, sidecar and driver as
    `profile --setting pods` (a separate measurement, not of the application), taken in the same
    minutes, so the machine's other load, which comes and goes, weighs on both alike; and once
    the setup's busy share (`profile.busy_points`). The profile fitted from the blocks (each
    point the median over the blocks) is under "profile"."""
    setup = setup_for(case.mode, case.filters)
    plan = [setup, hop_setup(setup)]
    targets = [
        PodTarget(
            {k: made[v] for k, v in roles.items()},
            s,
            workdir,
            args.pin,
            args.work_us,
            args.pin and args.shield,
        )
        for s, roles in zip(plan, PROFILE_ROLES, strict=True)
    ]
    points: list[dict] = []
    idle_rates = [float(r) for r in args.profile_idle_rates.split(",") if r]
    warmup = max(5, min(50, int(args.profile_seconds * 100)))

    def block() -> None:
        speeds.append(speed_probe())
        for target in targets:
            points.extend(measure_size(target, args.size, args.profile_seconds, warmup, idle_rates))

    def captured() -> dict:
        speeds.append(speed_probe())  # and the machine's speed then (procs.speed_probe)
        return {n: _captured(made["m" + n]) for n in services}

    # the machine's speed before each profile block and after each phase, in order
    speeds: list[dict[int, float]] = []
    block()
    if args.busy_turns:  # once: how much of its idle curve a pass pays after a busy wait
        points.extend(busy_points(setup, workdir, args.work_us, args.size,
                                  busy_calls(args.profile_seconds), turns=(args.busy_turns,)))  # fmt: skip
    measured = load(["--loads", ""], 1)
    # the meshed pods' counters after each phase: each phase's own stage clock and events
    measured["captured_by_phase"] = [captured()]
    loads = [x for x in args.loads.split(",") if x]
    for i, fraction in enumerate(loads):
        block()
        last = tracing if i == len(loads) - 1 else []
        part = load(["--closed-rate", repr(measured["closed"]["rate"]), "--loads", fraction,
                     *last], 1)  # fmt: skip
        measured["captured_by_phase"].append(captured())
        if last:
            measured["traced_from_ns"] = part["traced_from_ns"]
        measured["paced"] += part["paced"]
        measured["mesh_exchanges"] += part["mesh_exchanges"]
    block()
    platform = current_platform(backends=["tcp"], codecs=[case.mode])
    measured["profile"] = build_profile(plan, pooled(points), platform, PODS)
    measured["profile_blocks"] = 2 + len(loads)
    measured["speed_us"] = speeds  # block, phase, block, phase, ..., block
    return measured


def _measurement_file(out: Path, topology: str, case: Case) -> Path:
    return out / f"measured-{topology}-{case.protocol}-{case.label}.json"


def measured_cases(out: Path) -> list[tuple[str, Case, dict]]:
    """Every case measured into `out` so far (by this run or an earlier one), in a stable order."""
    found = []
    for path in sorted(out.glob("measured-*.json")):
        m = json.loads(path.read_text())
        found.append((m["topology"], Case.parse(m["case"]), m))
    order = list(TOPOLOGIES)
    return sorted(found, key=lambda f: (order.index(f[0]), f[1].protocol, f[1].label))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        type=Path,
        help="the profile that prices every row (without it, --interleave's own per case)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="profile each case's sidecar setup in pods of its own between the case's phases "
        "(before, between and after them) and price the case with that profile",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=0.5, help="per point of an interleaved block"
    )
    parser.add_argument(
        "--profile-idle-rates",
        default=",".join(f"{r:g}" for r in IDLE_RATES),
        help="paced rates (/s) of an interleaved block's idle curve",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="use a profile from another platform, or one not measured in the pods setting",
    )
    parser.add_argument(
        "--cases",
        default=CASES,
        help="comma-separated APP/MODE[+FILTER...]: the app's protocol (http, grpc) and the "
        "sidecars' mode and filters",
    )
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--work-us", type=float, default=100.0)
    # Five rounds of 6 s: with 3 of 1 s a gRPC fan-out's rounds held 56-216 exchanges per
    # deployment, too few for a p50 whose spread is milliseconds (its halves differed 25-43 %).
    parser.add_argument("--rounds", type=int, default=5, help="rounds per phase")
    parser.add_argument("--seconds", type=float, default=6.0, help="per round, at least")
    parser.add_argument(
        "--loads",
        default="0.3,0.7",
        help="paced rates, as fractions of the meshed closed-loop rate",
    )
    parser.add_argument("--traced-requests", type=int, default=20)
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder; cases measured into it by earlier runs join the table",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the load and every app on CPU 0 and every sidecar on CPU 1",
    )
    parser.add_argument(
        "--shield",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --pin, run the apps, the sidecars, the load and the interleaved profile's "
        "processes SCHED_FIFO, ahead of the machine's other tasks on their CPUs (default: on)",
    )
    parser.add_argument(
        "--fit-topologies",
        default="",
        help="also price the other topologies' rows with measured/predicted factors per setup "
        "fitted on these topologies' rows only (e.g. chain): the pods' cost beyond the profile, "
        "checked on held-out rows",
    )
    parser.add_argument(
        "--predict-only",
        action="store_true",
        help="measure nothing: predict again for the cases already measured into --out",
    )
    add_busy_option(parser)
    add_halt_poll_option(parser)


def _error(predicted: float, measured: float | None) -> float | None:
    return abs(predicted - measured) / abs(measured) if measured else None


def halves_differ(halves: list[float]) -> float | None:
    """How far the two halves of a measurement disagree, relative to their mean: |h0 - h1| / mean
    (None without two halves, or with a zero mean)."""
    if len(halves) != 2:
        return None
    mean = (halves[0] + halves[1]) / 2
    return abs(halves[0] - halves[1]) / abs(mean) if mean else None


def app_own_us(topology: str, work_us: float, measured: dict) -> float:
    """The apps' own CPU per side of a call beyond their work (their HTTP or gRPC stack), from
    the plain deployment's CPU per exchange: an input about the app without sidecars, as its
    latency is. Each call into an app has a server side (the callee's) and, but for the root
    call, whose client is the load outside the apps, a client side (the caller's); the stack's
    CPU is shared evenly by those sides. On shared CPUs it decides how much of the sidecars'
    work overlaps the apps'."""
    calls = len(TOPOLOGIES[topology])  # one call into each service per request
    sides = 2 * calls - 1
    return max(0.0, (plain_app_cpu_us(measured) - calls * work_us) / sides)


def apps_added_cores(measured: dict) -> tuple[float | None, list[float]]:
    """The apps' CPU the sidecars add: the meshed deployment's apps' cores less the plain one's,
    which served the same paired exchanges; and the same for each half of the rounds."""
    cores, halves = measured.get("cores", {}), measured.get("cores_halves", {})
    if "apps_mesh" not in cores or "apps_plain" not in cores:
        return None, []
    return cores["apps_mesh"] - cores["apps_plain"], [
        m - p
        for m, p in zip(halves.get("apps_mesh", []), halves.get("apps_plain", []), strict=False)
    ]


def plain_app_cpu_us(measured: dict) -> float:
    """The plain deployment's apps' CPU per request (µs, /proc), 0 where not measured."""
    cores, rate = measured.get("cores", {}).get("apps_plain"), measured["rate"]
    return cores * 1e6 / rate if cores and rate else 0.0


def timed_on_shared_cpus(graph: CallGraph, app_cpu_us: float) -> None:
    """Time a graph built from traces for a schedule on shared CPUs. There a span also times its
    neighbours' work (a sibling call's callee that ran first, the tracer's own bookkeeping) and a
    hop's span both stacks' CPU, none of which is a delay on no CPU. So the traces give the
    graph's shape (calls, order, parallel groups, sizes) and each callee's work (its server
    span's own time); the apps' CPU per request measured without sidecars (`app_cpu_us`) gives
    the rest, as each side's stack CPU, as in the hand-built graph (`app_own_us`)."""
    calls = graph.calls()
    sides = 2 * len(calls) - 1  # the root call's client is the load, outside the apps
    stack_ns = max(0.0, (app_cpu_us * 1000 - sum(c.work_ns for c in calls)) / sides)
    for call in calls:
        call.network_ns = 0.0
        call.app_ns = stack_ns
        call.client_ns = stack_ns if call.parent is not None else 0.0


def lane_share(captured: dict) -> str:
    """The share of the sidecars' requests a native lane finished in C, over every listener of
    every pod ("–" where the run did not record it)."""
    counts = [c["lane"][name] for c in captured.values() if "lane" in c for name in c["lane"]]
    requests = sum(count[0] for count in counts)
    if not requests:
        return "–"
    return f"{sum(count[2] for count in counts) / requests:.0%}"


def rows_for(topology: str, case: Case, m: dict, profile: Profile, args, out: Path) -> list[dict]:
    """One row per load (closed loop, then each paced rate): measured beside predicted."""
    external = profile.external_view()
    trace = out / m["trace"]
    overlay = {s: Service(s, case.mode, case.filters) for s in TOPOLOGIES[topology]}
    # the traced requests' traces (a run before traced_from_ns kept only those in its file)
    since = m.get("traced_from_ns", 0)
    graphs = graphs_from_traces(read_otlp_lines(trace), str(trace), overlay, since)
    phases = [("closed", m["closed"])] + [(f"{p['load']:g}", p) for p in m["paced"]]
    # pinned, the apps share CPU 0 and the sidecars CPU 1: predict the schedule on them
    placement = PINNED if m.get("pinned") else UNPLACED
    rows = []
    for load, measured in phases:
        rate, cores = measured["rate"], measured.get("cores", {}).get("sidecars")
        without, with_ = measured["p50_without_us"], measured["p50_with_us"]
        graph = graph_for(topology, case, m["size"], rate, m["work_us"],
                          app_own_us(topology, m["work_us"], measured))  # fmt: skip
        by_stage = predict(profile, graph, placement=placement)
        whole = predict(external, graph, placement=placement)
        # the same stage models without the hand-off term: what that term changes
        bare = (
            predict(profile, graph, WhatIf(((HANDOFF_STAGE, 0.0),)), placement)
            if profile.handoff
            else by_stage
        )
        app_cpu_us = plain_app_cpu_us(measured)
        for g in graphs:
            g.root.rate = rate
            if placement.shared:
                timed_on_shared_cpus(g, app_cpu_us)
        from_traces: list[Prediction] = [predict(profile, g, placement=placement) for g in graphs]
        row = {"topology": topology, "app": case.protocol, "mode": case.label, "load": load,
               "pinned": placement.shared,
               "rate": rate, "p50_without_us": without, "p50_with_us": with_,
               "overhead_us": measured["overhead_us"], "sidecar_cores": cores,
               "rounds_overhead_us": measured["rounds_overhead_us"],
               "foreign_cpus": m["foreign_cpus"], "captured": m["captured"],
               "predicted_us": by_stage.overhead_ns / 1000,
               "predicted_external_us": whole.overhead_ns / 1000,
               "predicted_cores": by_stage.cpu_cores,
               "predicted_without_handoff_us": bare.overhead_ns / 1000,
               "predicted_external_cores": whole.cpu_cores,
               "predicted_from_traces_us": statistics.median(p.overhead_ns / 1000 for p in from_traces),
               "traces": len(from_traces),
               "hops_us": {h.call: h.latency_ns / 1000 for h in by_stage.hops},
               "hops_whole": {h.call: h.whole for h in by_stage.hops if h.whole}}  # fmt: skip
        # The proxies' own work per app request: counted by their stage clocks in the pods,
        # and as the profile's stage models price it (all passes, without the idle and hand-off
        # terms, which happen outside the stages).
        requests = m["mesh_exchanges"]
        row["stage_clock_us"] = (
            sum(c["stage_ns"] for c in m["captured"].values()) / requests / 1000
            if requests
            else None
        )
        row["predicted_stage_sum_us"] = (
            sum(
                ns
                for h in by_stage.hops
                for stage, ns in h.stages_ns.items()
                if stage not in (IDLE_STAGE, HANDOFF_STAGE)
            )
            / 1000
        )
        halves = measured["overhead_halves_us"]
        # The measurement's own spread: its two halves' disagreement, relative to the whole.
        row["halves_differ"] = halves_differ(halves)
        row["cpu_halves_differ"] = halves_differ(
            measured.get("cores_halves", {}).get("sidecars", [])
        )
        row["error"] = _error(row["predicted_us"], row["overhead_us"])
        row["error_without_handoff"] = _error(
            row["predicted_without_handoff_us"], row["overhead_us"]
        )
        row["error_external"] = _error(row["predicted_external_us"], row["overhead_us"])
        row["error_from_traces"] = _error(row["predicted_from_traces_us"], row["overhead_us"])
        row["cpu_error"] = _error(row["predicted_cores"], cores)
        row["cpu_error_external"] = _error(row["predicted_external_cores"], cores)
        added, added_halves = apps_added_cores(measured)
        row["apps_added_cores"] = added
        row["apps_added_halves_differ"] = halves_differ(added_halves)
        row["predicted_app_cores"] = by_stage.app_cpu_cores
        # a profile without the apps' side (loopback, or older) predicts none: nothing to check
        row["app_cpu_error"] = _error(by_stage.app_cpu_cores, added) if profile.app_cpu else None
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    if args.profile is None and not (args.interleave or args.predict_only):
        print("pyproxy bench validate: --profile, or --interleave to profile each case as it "
              "runs", file=sys.stderr)  # fmt: skip
        return 2
    profile = Profile.load(args.profile) if args.profile is not None else None
    forced = None
    try:
        if profile is not None:
            check_platform(profile, current_platform(), args.force)
            forced = check_setting(profile, PODS, args.force)
        cases = [Case.parse(c) for c in args.cases.split(",") if c]
    except Exception as exc:  # PlatformMismatch, a bad case: say why, as predict does
        print(f"pyproxy bench validate: {exc}", file=sys.stderr)
        return 2
    if forced:
        print(f"pyproxy bench validate: warning: forced across settings: {forced}", file=sys.stderr)
    missing = missing_capabilities()
    if missing:
        print(f"pyproxy bench validate: pods need {', '.join(missing)}", file=sys.stderr)
        return 2
    if refused := halt_poll_refused(args.halt_poll_ns):
        print(f"pyproxy bench validate: {refused}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / time.strftime("validate-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    inputs = {k: str(v) for k, v in vars(args).items() if k != "func"}
    with open(out / "inputs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(inputs) + "\n")  # every invocation that measured into this folder
    failed: dict[str, str] = {}
    try:
        with halt_polling(None if args.predict_only else args.halt_poll_ns) as polled:
            for topology in [] if args.predict_only else args.topologies.split(","):
                for case in cases:
                    name = f"{topology}/{case.text}"
                    try:
                        measured = run_case(topology, case, args, out)
                    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                        failed[name] = str(exc)  # one broken case is reported, the others run
                        print(f"  validate: {name} FAILED: {exc}", file=sys.stderr, flush=True)
                        continue
                    measured["halt_poll_ns"] = polled  # as read back while it ran
                    _measurement_file(out, topology, case).write_text(json.dumps(measured) + "\n")
                    print(f"  validate: {name} done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("pyproxy bench validate: interrupted; writing what was measured", file=sys.stderr)
    # The table covers every case measured into this folder: a validation run in chunks (one
    # invocation per few cases, all with the same --out) ends with one table, and
    # --predict-only prices the same measurements again with another profile.
    rows: list[dict] = []
    for topology, case, measured in measured_cases(out):
        # an explicit --profile prices every row; without one, each case's interleaved profile
        priced = profile
        if priced is None and measured.get("profile"):
            priced = Profile.load(out / measured["profile"])
        if priced is None:
            failed[f"{topology}/{case.text}"] = "no profile: measured without --interleave"
            continue
        rows += rows_for(topology, case, measured, priced, args, out)
    (out / "validation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps({"failed": failed}, indent=2) + "\n")
    text = table(rows)
    if args.fit_topologies:
        text += held_out_table(rows, set(args.fit_topologies.split(",")))
    (out / "table.md").write_text(text)
    if rows:
        from pyproxy.bench.plots import predicted_vs_measured  # lazy: matplotlib only when plotting

        predicted_vs_measured(
            {"stage models": [(r["overhead_us"], r["predicted_us"]) for r in rows],
             "external models": [(r["overhead_us"], r["predicted_external_us"]) for r in rows]},
            out / "predicted_vs_measured.png",
        )  # fmt: skip
    print(text)
    print(f"results: {out}")
    return 1 if failed else 0


def pod_factors(rows: list[dict], fit_on: set[str]) -> dict[str, tuple[float, float]]:
    """Per app/sidecars setup, what the pods cost beyond the profile's loopback models: the median
    ratio of measured to predicted (stage models) latency overhead, and of sidecar CPU, over the
    rows of the `fit_on` topologies only, so the others stay held out."""
    fits: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        if r["topology"] not in fit_on:
            continue
        latency, cpu = fits.setdefault(f"{r['app']}/{r['mode']}", ([], []))
        if r["predicted_us"] > 0:
            latency.append(r["overhead_us"] / r["predicted_us"])
        if r["sidecar_cores"] is not None and r["predicted_cores"] > 0:
            cpu.append(r["sidecar_cores"] / r["predicted_cores"])
    return {
        setup: (statistics.median(lat) if lat else 1.0, statistics.median(cpu) if cpu else 1.0)
        for setup, (lat, cpu) in fits.items()
    }


def held_out(rows: list[dict], fit_on: set[str]) -> list[dict]:
    """The rows of the other topologies, priced with `pod_factors` fitted on `fit_on`'s rows."""
    factors = pod_factors(rows, fit_on)
    out = []
    for r in rows:
        setup = f"{r['app']}/{r['mode']}"
        if r["topology"] in fit_on or setup not in factors:
            continue
        latency, cpu = factors[setup]
        predicted_us, predicted_cores = r["predicted_us"] * latency, r["predicted_cores"] * cpu
        out.append(r | {"factors": factors[setup], "calibrated_us": predicted_us,
                        "calibrated_cores": predicted_cores,
                        "calibrated_error": _error(predicted_us, r["overhead_us"]),
                        "calibrated_cpu_error": _error(predicted_cores, r["sidecar_cores"])})  # fmt: skip
    return out


def held_out_table(rows: list[dict], fit_on: set[str]) -> str:
    held = held_out(rows, fit_on)
    if not held:
        return ""
    lines = [
        f"\nheld out: the {', '.join(sorted({r['topology'] for r in held}))} rows priced with "
        f"factors fitted on the {', '.join(sorted(fit_on))} rows only\n",
        "| app | protocol | sidecars | load | factors (latency, CPU) | measured overhead µs "
        "| calibrated µs | error | sidecar CPU cores | calibrated | error |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in held:
        cores = "–" if r["sidecar_cores"] is None else f"{r['sidecar_cores']:.3f}"
        lines.append(
            f"| {r['topology']} | {r['app']} | {r['mode']} | {r['load']} "
            f"| {r['factors'][0]:.2f}, {r['factors'][1]:.2f} | {r['overhead_us']:.1f} "
            f"| {r['calibrated_us']:.1f} | {_pct(r['calibrated_error'])} | {cores} "
            f"| {r['calibrated_cores']:.3f} | {_pct(r['calibrated_cpu_error'])} |"
        )
    lines.append(
        "\nmedian / worst absolute error, held out: "
        + "; ".join((_summary("latency", [r["calibrated_error"] for r in held]),
                     _summary("CPU", [r["calibrated_cpu_error"] for r in held])))
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def _pct(e: float | None) -> str:
    return "–" if e is None else f"{e * 100:.0f} %"


def _summary(name: str, errors: list[float | None]) -> str:
    known = sorted(e for e in errors if e is not None)
    if not known:
        return f"{name}: –"
    return f"{name} {statistics.median(known) * 100:.0f} % / {known[-1] * 100:.0f} %"


def _apps_added_table(rows: list[dict]) -> list[str]:
    """What the sidecars add to the apps' own CPU, measured (meshed apps less plain ones) beside
    the profile's `app_cpu` lines."""
    lines = ["", "| app | protocol | sidecars | load | apps' CPU the sidecars add, cores | halves differ "
             "| predicted | error |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        added = "–" if r.get("apps_added_cores") is None else f"{r['apps_added_cores']:.3f}"
        lines.append(f"| {r['topology']} | {r['app']} | {r['mode']} | {r['load']} | {added} "
                     f"| {_pct(r.get('apps_added_halves_differ'))} | {r['predicted_app_cores']:.3f} "
                     f"| {_pct(r.get('app_cpu_error'))} |")  # fmt: skip
    lines.append(
        "\nmedian / worst absolute error, the apps' added CPU: "
        + _summary("from the profile", [r.get("app_cpu_error") for r in rows])
    )
    return lines


def table(rows: list[dict]) -> str:
    lines = [
        "| app | protocol | sidecars | load | rate /s | measured overhead µs | halves differ | predicted (stages) µs | error "
        "| from traces µs | predicted (external) µs | error | sidecar CPU cores | halves differ | predicted (stages) | error "
        "| predicted (external) | error |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cores = "–" if r["sidecar_cores"] is None else f"{r['sidecar_cores']:.3f}"
        lines.append(
            f"| {r['topology']} | {r['app']} | {r['mode']} | {r['load']} | {r['rate']:.0f} "
            f"| {r['overhead_us']:.1f} | {_pct(r['halves_differ'])} | {r['predicted_us']:.1f} | {_pct(r['error'])} "
            f"| {r['predicted_from_traces_us']:.1f} "
            f"| {r['predicted_external_us']:.1f} | {_pct(r['error_external'])} "
            f"| {cores} | {_pct(r['cpu_halves_differ'])} | {r['predicted_cores']:.3f} | {_pct(r['cpu_error'])} "
            f"| {r['predicted_external_cores']:.3f} | {_pct(r['cpu_error_external'])} |"
        )
    if any(r.get("pinned") for r in rows):
        lines.append("\npinned rows: predicted as a schedule of the apps' work on CPU 0 and the "
                     "sidecars' passes on CPU 1, each pass waking after its CPU's idle gap and, by the setup's "
                     "busy share, its sidecar's own wait")  # fmt: skip
    if rows:
        lines.append(
            "\nmedian / worst absolute error, latency: "
            + "; ".join((_summary("stage models", [r["error"] for r in rows]),
                         _summary("stage models without the hand-off",
                                  [r.get("error_without_handoff") for r in rows]),
                         _summary("from traces", [r["error_from_traces"] for r in rows]),
                         _summary("external models", [r["error_external"] for r in rows])))
            + "\nmedian / worst difference between the two halves of each measurement: "
            + "; ".join((_summary("latency", [r["halves_differ"] for r in rows]),
                         _summary("CPU", [r["cpu_halves_differ"] for r in rows])))
            + "\nmedian / worst absolute error, CPU: "
            + "; ".join((_summary("stage models", [r["cpu_error"] for r in rows]),
                         _summary("external models", [r["cpu_error_external"] for r in rows])))
        )  # fmt: skip
    if any(r.get("app_cpu_error") is not None for r in rows):
        lines += _apps_added_table(rows)
    lines += [
        "",
        "| app | protocol | sidecars | proxies' own work per request: stage clocks in the pods µs "
        "| the profile's stage models µs | requests finished in C (native lane) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["load"] == "closed" and r.get("stage_clock_us") is not None:
            lines.append(f"| {r['topology']} | {r['app']} | {r['mode']} | {r['stage_clock_us']:.1f} "
                         f"| {r['predicted_stage_sum_us']:.1f} | {lane_share(r['captured'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"
