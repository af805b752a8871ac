"""Predict what sidecars cost an application: per-hop overhead, critical-path latency, CPU cores.

Every call crosses the caller's sidecar (outbound) and the callee's sidecar
(inbound); each sidecar costs the sum of its stages' models at the call's
message size. The profile's size is the echo size each way, so a call with a
request of q bytes and a response of p bytes is priced at s = (q + p) / 2.
End-to-end latency is recomputed over the whole tree with the overheads added,
so a parallel branch that was not critical can become so. Below the rate at
which the profile measured a sidecar back to back, each sidecar pass also
costs what the profile's idle curve measured at the call's rate (stage
`idle`): the wake-ups of a proxy that goes idle between exchanges. Each hop
through sidecars also costs the profile's hand-off once (stage `handoff`):
the latency between the processes that the proxy's stage clock cannot see,
such as waking a proxy on another CPU and being woken by it. The profile
measured it for a request going app → sidecar → app; a hop through two
sidecars (the caller's outbound, the callee's inbound) makes the same trips
to and from the sidecars, which pass it between each other as the plain
path's apps do. Latency only: its CPU is in the CPU models, read from /proc.
A call between two sidecars of one setup that the profile measured as a
whole hop (`hop:NAME`: the driver's pod captured too) is priced by that
measurement instead, its stages, hand-off, untimed CPU and idle curve once.
The calls
of a parallel group share their caller's sidecar, one event loop: the slowest
also waits behind the others' CPU there.

With a placement that puts processes on shared CPUs (`--pin`: the apps on one
CPU, the sidecars on the other), the latency is no longer a critical path:
`schedule` lays every pass and every app's work on its CPU, so parallel calls'
apps take turns, sidecar passes overlap other calls' app work, and a pass pays
the idle curve for the gaps it had rather than per pass at the call's rate: the
curve at the time its CPU idled before it, and the setup's busy share of what
the curve adds for the rest of its sidecar's own wait, while the CPU ran other
sidecars. The profile measures that share (`fit_busy_share`): about all of it
for a gRPC sidecar, whose code and data go cold whatever ran meanwhile, about
none for a TCP one, whose cost is waking the idle CPU.

The mesh also costs the apps' own CPU: an app's sends and receives go to a
sidecar on another CPU, through the capture's rules. A pods profile measures
it per setup (`Profile.app_cpu`: the echo behind the sidecar less the plain
echo, per exchange), and each call pays it once for each side that crosses a
sidecar: the callee's behind its inbound one, the caller's through its
outbound one. It is reported beside the sidecars' CPU (`app_cpu_cores`), not
in it; no what-if changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyproxy.bench.callgraph import Call, CallGraph, Service
from pyproxy.bench.model import HOP_PREFIX, Linear, Profile, StageModel
from pyproxy.bench.schedule import UNPLACED, HopCost, Placement, Wake
from pyproxy.bench.schedule import latency as schedule_latency

# The stage a sidecar's wake-ups cost at rates below its closed loop (the profile's IdleCurve).
IDLE_STAGE = "idle"
# The latency of a pass outside every timed stage (the profile's Handoff).
HANDOFF_STAGE = "handoff"
# The CPU of a pass outside every timed stage (the profile's untimed CPU line).
UNTIMED_STAGE = "untimed"


class WhatIfError(ValueError):
    """A --what-if the profile cannot answer (unknown stage or backend, bad factor)."""


@dataclass(frozen=True, slots=True)
class WhatIf:
    """Design questions: scale stages by a factor, or switch every sidecar's IPC backend."""

    factors: tuple[tuple[str, float], ...] = ()
    ipc: str | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> WhatIf:
        factors, ipc = [], None
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise WhatIfError(f"--what-if {item!r}: expected stage=factor or ipc=backend")
            try:
                factor = float(value)
            except ValueError:
                if key != "ipc":
                    raise WhatIfError(f"--what-if {item!r}: {value!r} is not a number") from None
                ipc = value
                continue
            if factor < 0:
                raise WhatIfError(f"--what-if {item!r}: a factor must be >= 0")
            factors.append((key, factor))
        return cls(tuple(factors), ipc)

    def label(self) -> str:
        parts = [f"{k}×{v:g}" for k, v in self.factors] + ([f"ipc={self.ipc}"] if self.ipc else [])
        return ", ".join(parts) or "as measured"


def check_what_if(profile: Profile, what_if: WhatIf) -> None:
    """Refuse a question the profile has no stage (or backend) for."""
    known = {stage for stages in profile.modes.values() for stage in stages}
    known |= {f"filter:{name}" for name in profile.filters}
    if profile.idle:
        known.add(IDLE_STAGE)
    if profile.handoff:
        known.add(HANDOFF_STAGE)
    if profile.untimed:
        known.add(UNTIMED_STAGE)
    for stage, factor in what_if.factors:
        if stage not in known:
            raise WhatIfError(
                f"--what-if {stage}={factor:g}: no stage {stage!r} in the profile ({sorted(known)})"
            )
    if what_if.ipc not in (None, "tcp") and what_if.ipc not in profile.ipc:
        raise WhatIfError(
            f"--what-if ipc={what_if.ipc}: backend not in the profile ({['tcp', *sorted(profile.ipc)]})"
        )


def sidecar_stages(
    profile: Profile, service: Service, what_if: WhatIf = WhatIf()
) -> dict[str, StageModel]:
    """The stage models of one service's sidecar under the profile and the what-if."""
    key = setup_key(profile, service)
    if key not in profile.modes:
        raise WhatIfError(
            f"service {service.name}: mode {service.mode!r} is not in the profile ({sorted(profile.modes)})"
        )
    stages = dict(profile.modes[key])
    ipc = what_if.ipc or service.ipc
    if ipc != "tcp":
        if ipc not in profile.ipc:
            raise WhatIfError(
                f"service {service.name}: IPC backend {ipc!r} is not in the profile ({sorted(profile.ipc)})"
            )
        stages["ipc"] = profile.ipc[ipc]
    for name in service.filters if key == service.mode else ():
        if name not in profile.filters:
            raise WhatIfError(
                f"service {service.name}: filter {name!r} is not in the profile ({sorted(profile.filters)})"
            )
        stages[f"filter:{name}"] = profile.filters[name]
    for stage, factor in what_if.factors:
        if stage in stages:
            stages[stage] = stages[stage].scaled(factor)
    return stages


def setup_key(profile: Profile, service: Service) -> str:
    """The profile's setup that prices the service's sidecar: the one measured with exactly its
    mode and filters if the profile has it (`MODE+F1+F2`), else its mode's, to which each
    filter's model is added."""
    exact = "+".join((service.mode, *service.filters))
    return exact if service.filters and exact in profile.modes else service.mode


@dataclass(slots=True)
class Hop:
    call: str
    caller: str | None
    callee: str
    size: float
    rate: float
    latency_ns: float
    cpu_cores: float
    stages_ns: dict[str, float]
    cpu_stages: dict[str, float]
    outbound_cpu_ns: float = 0.0  # the caller's sidecar's CPU per exchange of this call
    # for a schedule on shared CPUs: each side's passes (stages, ns) and the rest (idle, hand-off)
    outbound_ns: float = 0.0
    inbound_ns: float = 0.0
    whole: str = ""  # the profile's whole-hop setup that priced it (see `hop_key`), if one did
    # what its sidecars add to the apps' own CPU per exchange (`Profile.app_cpu`): the caller's
    # app through its outbound sidecar, the callee's behind its inbound one
    outbound_app_ns: float = 0.0
    inbound_app_ns: float = 0.0

    @property
    def app_cpu_cores(self) -> float:
        return self.rate * (self.outbound_app_ns + self.inbound_app_ns) / 1e9


@dataclass(slots=True)
class Prediction:
    graph: str
    what_if: str
    hops: list[Hop]
    base_ns: float
    mesh_ns: float
    path_before: list[str]
    path_after: list[str]
    cpu_cores: float
    path_stages_ns: dict[str, float] = field(default_factory=dict)
    cpu_stages: dict[str, float] = field(default_factory=dict)
    app_cpu_cores: float = 0.0  # the apps' own CPU the sidecars add, beside their own

    @property
    def overhead_ns(self) -> float:
        return self.mesh_ns - self.base_ns

    @property
    def dominant_latency(self) -> str:
        return max(self.path_stages_ns, key=self.path_stages_ns.__getitem__, default="")

    @property
    def dominant_cpu(self) -> str:
        return max(self.cpu_stages, key=self.cpu_stages.__getitem__, default="")

    @property
    def path_moved(self) -> bool:
        return self.path_before != self.path_after

    def to_json(self) -> dict:
        return {
            "graph": self.graph,
            "what_if": self.what_if,
            "latency_without_mesh_us": self.base_ns / 1000,
            "latency_with_mesh_us": self.mesh_ns / 1000,
            "latency_overhead_us": self.overhead_ns / 1000,
            "critical_path_before": self.path_before,
            "critical_path_after": self.path_after,
            "critical_path_moved": self.path_moved,
            "cpu_overhead_cores": self.cpu_cores,
            "app_cpu_overhead_cores": self.app_cpu_cores,
            "dominant_latency_stage": self.dominant_latency,
            "dominant_cpu_stage": self.dominant_cpu,
            "critical_path_stages_us": {k: v / 1000 for k, v in self.path_stages_ns.items()},
            "cpu_stages_cores": self.cpu_stages,
            "hops": [
                {
                    "call": h.call,
                    "caller": h.caller,
                    "callee": h.callee,
                    "size_bytes": h.size,
                    "rate_per_s": h.rate,
                    "latency_overhead_us": h.latency_ns / 1000,
                    "cpu_overhead_cores": h.cpu_cores,
                    "app_cpu_overhead_cores": h.app_cpu_cores,
                }
                for h in self.hops
            ],
        }


def _hop(
    profile: Profile, graph: CallGraph, call: Call, caller: str | None, rate: float, what_if: WhatIf
) -> Hop:
    size = (call.request + call.response) / 2
    if caller is not None and (
        key := hop_key(profile, graph.services[caller], graph.services[call.callee], what_if)
    ):
        return _whole_hop(profile, call, caller, key, size, rate, what_if)
    stages_ns: dict[str, float] = {}
    cpu_stages: dict[str, float] = {}
    sides = [graph.services[caller]] if caller is not None else []
    sides.append(graph.services[call.callee])
    factors = dict(what_if.factors)
    outbound_cpu_ns = 0.0
    handoff_ns = 0.0
    app_ns = [0.0, 0.0]  # per exchange: the caller's app, the callee's
    side_ns = [0.0, 0.0]  # outbound, inbound
    for side, service in enumerate(sides):
        if not service.sidecar:
            continue
        slot = side if caller is not None else 1  # the root's one side is the callee's
        cpu_before = sum(cpu_stages.values())
        for stage, model in sidecar_stages(profile, service, what_if).items():
            ns = model.latency.at(size)
            stages_ns[stage] = stages_ns.get(stage, 0.0) + ns
            side_ns[slot] += ns
            cpu_stages[stage] = cpu_stages.get(stage, 0.0) + rate * model.cpu.at(size) / 1e9
        if (curve := profile.idle.get(setup_key(profile, service))) is not None:
            # Below the closed-loop rate the sidecar idles between exchanges and pays to wake up.
            latency, cpu = curve.at(rate)
            factor = factors.get(IDLE_STAGE, 1.0)
            stages_ns[IDLE_STAGE] = stages_ns.get(IDLE_STAGE, 0.0) + factor * latency
            cpu_stages[IDLE_STAGE] = cpu_stages.get(IDLE_STAGE, 0.0) + factor * rate * cpu / 1e9
        if (untimed := _per_setup(profile, profile.untimed, service, size)) is not None:
            cpu_stages[UNTIMED_STAGE] = cpu_stages.get(UNTIMED_STAGE, 0.0) + (
                factors.get(UNTIMED_STAGE, 1.0) * rate * untimed / 1e9
            )
        if (added := _per_setup(profile, profile.app_cpu, service, size)) is not None:
            # the caller's side through its outbound sidecar, the callee's through its inbound
            app_ns[slot] = max(0.0, added)
        handoffs = {name: h.latency for name, h in profile.handoff.items()}
        if (handoff := _per_setup(profile, handoffs, service, size)) is not None:
            handoff_ns = max(handoff_ns, handoff)
        if caller is not None and side == 0 and rate > 0:
            outbound_cpu_ns = (sum(cpu_stages.values()) - cpu_before) * 1e9 / rate
    if handoff_ns:
        # Once per hop: the caller's outbound and the callee's inbound sidecar hand the request
        # to each other as the two apps of the plain path do; the hand-offs the plain path does
        # not have are the app → sidecars → app ones, as many as the profile's one pass has.
        stages_ns[HANDOFF_STAGE] = factors.get(HANDOFF_STAGE, 1.0) * handoff_ns
    return Hop(call.id, caller, call.callee, size, rate, sum(stages_ns.values()),
               sum(cpu_stages.values()), stages_ns, cpu_stages, outbound_cpu_ns,
               side_ns[0], side_ns[1], outbound_app_ns=app_ns[0],
               inbound_app_ns=app_ns[1])  # fmt: skip


def hop_key(profile: Profile, caller: Service | None, callee: Service, what_if: WhatIf) -> str:
    """The profile's whole-hop setup (`hop:NAME`) that prices a call from `caller` to `callee`,
    or "": both sidecars of one setup NAME the profile measured as a hop, and no IPC what-if
    (the hop was measured over the capture's TCP)."""
    if caller is None or not (caller.sidecar and callee.sidecar) or what_if.ipc:
        return ""
    key = setup_key(profile, callee)
    if setup_key(profile, caller) != key or caller.ipc != "tcp" or callee.ipc != "tcp":
        return ""
    return HOP_PREFIX + key if HOP_PREFIX + key in profile.modes else ""


def _whole_hop(
    profile: Profile, call: Call, caller: str, key: str, size: float, rate: float, what_if: WhatIf
) -> Hop:
    """A call priced by the profile's measurement of a whole hop (`hop_key`): its stage clocks
    (both sidecars' listeners), its hand-off, untimed CPU and idle curve, each once per call.
    The hop's stages are split evenly between the two sidecars' passes."""
    factors = dict(what_if.factors)
    stages_ns: dict[str, float] = {}
    cpu_stages: dict[str, float] = {}
    for stage, model in profile.modes[key].items():
        factor = factors.get(stage, 1.0)
        stages_ns[stage] = factor * model.latency.at(size)
        cpu_stages[stage] = factor * rate * model.cpu.at(size) / 1e9
    passes_ns = sum(stages_ns.values())
    if (curve := profile.idle.get(key)) is not None:
        latency, cpu = curve.at(rate)
        stages_ns[IDLE_STAGE] = factors.get(IDLE_STAGE, 1.0) * latency
        cpu_stages[IDLE_STAGE] = factors.get(IDLE_STAGE, 1.0) * rate * cpu / 1e9
    if (untimed := profile.untimed.get(key)) is not None:
        cpu_stages[UNTIMED_STAGE] = factors.get(UNTIMED_STAGE, 1.0) * rate * untimed.at(size) / 1e9
    if (handoff := profile.handoff.get(key)) is not None:
        stages_ns[HANDOFF_STAGE] = factors.get(HANDOFF_STAGE, 1.0) * handoff.latency.at(size)
    # the profile saw the callee's side only (its driver answered both paths); the caller's
    # side crosses its own sidecar the same way
    app_ns = max(0.0, added.at(size)) if (added := profile.app_cpu.get(key)) else 0.0
    cores = sum(cpu_stages.values())
    return Hop(call.id, caller, call.callee, size, rate, sum(stages_ns.values()), cores,
               stages_ns, cpu_stages, cores * 1e9 / rate / 2 if rate > 0 else 0.0,
               passes_ns / 2, passes_ns / 2, key, app_ns, app_ns)  # fmt: skip


def _per_setup(
    profile: Profile, lines: dict[str, Linear], service: Service, size: float
) -> float | None:
    """A term the profile fitted per setup (hand-off, untimed CPU) for the service's sidecar: the
    exact setup's if the profile measured it; else its mode's, plus what each of its filters
    added to it where the profile measured that filter's setup (a filtered request takes
    another path through the proxy, with untimed work of its own)."""
    key = setup_key(profile, service)
    if key != service.mode:
        return lines[key].at(size) if key in lines else None
    plain = lines.get(service.mode)
    if plain is None:
        return None
    ns = plain.at(size)
    for name in service.filters:
        if (filtered := lines.get(f"{service.mode}+{name}")) is not None:
            ns += filtered.at(size) - plain.at(size)
    return ns


def _duration(
    call: Call, extra: dict[str, float], serial: dict[str, float] | None = None
) -> tuple[float, list[str]]:
    """The call's latency and its critical path (call ids), given each call's added latency.

    `serial` is each call's CPU per exchange in its caller's sidecar: the calls of one
    parallel group all pass through that one proxy (one event loop), so the slowest
    waits behind the others' passes there, (k - 1) of them in a group of k.
    """
    total = call.network_ns + call.work_ns + call.app_ns + call.client_ns + extra.get(call.id, 0.0)
    path = [call.id]
    groups: dict[int, list[Call]] = {}
    for child in call.children:
        groups.setdefault(child.group, []).append(child)
    for index in sorted(groups):
        group = groups[index]
        slowest = max((_duration(child, extra, serial) for child in group), key=lambda d: d[0])
        total += slowest[0]
        if serial and len(group) > 1:
            total += (len(group) - 1) * max(serial.get(child.id, 0.0) for child in group)
        path += slowest[1]
    return total, path


def predict(
    profile: Profile,
    graph: CallGraph,
    what_if: WhatIf = WhatIf(),
    placement: Placement = UNPLACED,
) -> Prediction:
    """The graph's overhead; with a `placement` that shares CPUs, its latency is a schedule of
    the processes' work on them (see `schedule`), not the critical path."""
    check_what_if(profile, what_if)
    hops: list[Hop] = []
    todo: list[tuple[Call, str | None, float]] = [(graph.root, None, graph.root.rate or 1.0)]
    while todo:
        call, caller, rate = todo.pop()
        hops.append(_hop(profile, graph, call, caller, rate, what_if))
        for child in call.children:
            todo.append((child, call.callee, child.rate if child.rate is not None else rate))
    extra = {h.call: h.latency_ns for h in hops}
    base, before = _duration(graph.root, {})
    mesh, after = _duration(graph.root, extra, {h.call: h.outbound_cpu_ns for h in hops})
    by_call = {h.call: h for h in hops}
    path_stages: dict[str, float] = {}
    for call_id in after:
        for stage, ns in by_call[call_id].stages_ns.items():
            path_stages[stage] = path_stages.get(stage, 0.0) + ns
    cpu_stages: dict[str, float] = {}
    for h in hops:
        for stage, cores in h.cpu_stages.items():
            cpu_stages[stage] = cpu_stages.get(stage, 0.0) + cores
    if placement.shared:
        base, mesh = _placed(profile, graph, placement, by_call, what_if, path_stages, cpu_stages)
    return Prediction(graph.name, what_if.label(), hops, base, mesh, before, after,
                      sum(cpu_stages.values()), path_stages, cpu_stages,
                      sum(h.app_cpu_cores for h in hops))  # fmt: skip


def _placed(
    profile: Profile,
    graph: CallGraph,
    placement: Placement,
    hops: dict[str, Hop],
    what_if: WhatIf,
    path_stages: dict[str, float],
    cpu_stages: dict[str, float],
) -> tuple[float, float]:
    """Latency without and with sidecars when processes share CPUs: the schedule of their work.

    Apps on one CPU take turns, a sidecar's pass overlaps other calls' work on the other CPU,
    and the calls of a parallel group queue on their caller's sidecar, all in the schedule. A
    sidecar then pays to wake up by its idle curve (`IdleCurve.after_gaps`): at the gap its CPU
    idled before the pass, and the setup's busy share (`fit_busy_share`) of what the curve adds
    for the rest of the sidecar's own wait, when its CPU ran other sidecars instead of idling.
    A pass that follows its sidecar's previous one closely pays nothing. `path_stages` and
    `cpu_stages` get the schedule's `idle` in place of each pass's.
    """
    factor = dict(what_if.factors).get(IDLE_STAGE, 1.0)
    rate = graph.root.rate or 0.0
    period = 1e9 / rate if rate else 0.0

    def waking(setup: str, hop: bool = False) -> Wake | None:
        """The wake-up of a pass of `setup`; of each pass of its whole hop with `hop`. The hop's
        curve was measured for both passes at once, its first pass after the CPU's idle gap,
        the second after as long a wait on the busy CPU: the curve is 1 + share of one pass's,
        and each pass pays its part after its own gaps."""
        curve = profile.idle.get(HOP_PREFIX + setup if hop else setup) if factor else None
        if curve is None:
            return None
        share = profile.busy_share.get(setup, 0.0)
        scale = factor / (1 + share) if hop else factor
        return lambda gap, cpu_gap: curve.after_gaps(gap, cpu_gap, share, scale)

    def wake(service: Service | None) -> Wake | None:
        return None if service is None else waking(setup_key(profile, service))

    def cost(call: Call, wakes: bool = True) -> HopCost:
        hop = hops[call.id]
        out = graph.services[hop.caller] if hop.caller is not None else None
        inbound = graph.services[hop.callee]
        handoff = hop.stages_ns.get(HANDOFF_STAGE, 0.0)
        if hop.whole:
            part = waking(hop.whole.removeprefix(HOP_PREFIX), hop=True) if wakes else None
            return HopCost(hop.outbound_ns, hop.inbound_ns, handoff, part, part)
        return HopCost(hop.outbound_ns, hop.inbound_ns, handoff,
                       wake(out if out is not None and out.sidecar and wakes else None),
                       wake(inbound if inbound.sidecar and wakes else None))  # fmt: skip

    base, _ = schedule_latency(graph, placement, lambda call: HopCost())
    mesh, wake_cpu_ns = schedule_latency(graph, placement, cost, period)
    if IDLE_STAGE in path_stages or IDLE_STAGE in cpu_stages:
        asleep, _ = schedule_latency(graph, placement, lambda call: cost(call, False), period)
        path_stages[IDLE_STAGE] = mesh - asleep
        cpu_stages[IDLE_STAGE] = rate * wake_cpu_ns / 1e9
    return base, mesh


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted values (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def distribution(predictions: Sequence[Prediction]) -> dict:
    """Batch mode: the spread of end-to-end overhead and CPU over many graphs."""

    def spread(values: list[float]) -> dict[str, float]:
        return {f"p{q}": percentile(values, q / 100) for q in (50, 90, 99)} | {
            "max": max(values, default=0.0)
        }

    dominant: dict[str, int] = {}
    for p in predictions:
        dominant[p.dominant_latency] = dominant.get(p.dominant_latency, 0) + 1
    return {
        "graphs": len(predictions),
        "latency_overhead_us": spread([p.overhead_ns / 1000 for p in predictions]),
        "cpu_overhead_cores": spread([p.cpu_cores for p in predictions]),
        "app_cpu_overhead_cores": spread([p.app_cpu_cores for p in predictions]),
        "critical_path_moved": sum(p.path_moved for p in predictions),
        "dominant_latency_stage": dominant,
    }


def report(predictions: Sequence[Prediction]) -> str:
    """Markdown: the per-hop table of each prediction and its totals."""
    out = []
    for p in predictions:
        out.append(f"### {p.graph} ({p.what_if})\n")
        out.append("| call | caller → callee | size B | rate /s | overhead µs | CPU cores |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: |")
        for h in p.hops:
            out.append(f"| {h.call} | {h.caller or 'client'} → {h.callee} | {h.size:.0f} | {h.rate:g} "
                       f"| {h.latency_ns / 1000:.1f} | {h.cpu_cores:.4f} |")  # fmt: skip
        moved = " (moved)" if p.path_moved else ""
        out.append(
            f"\nend-to-end: {p.base_ns / 1000:.1f} µs → {p.mesh_ns / 1000:.1f} µs, overhead "
            f"**{p.overhead_ns / 1000:.1f} µs**; critical path {' → '.join(p.path_after)}{moved}; "
            f"CPU overhead **{p.cpu_cores:.4f} cores** in the sidecars"
            + (f", {p.app_cpu_cores:.4f} in the apps" if p.app_cpu_cores else "")
            + f"; dominant: {p.dominant_latency} (latency), "
            f"{p.dominant_cpu} (CPU)\n"
        )
    return "\n".join(out)
