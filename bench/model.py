"""Linear cost models of the sidecar's stages and the profile that stores them, keyed by platform.

Latency of one stage for one request/response exchange whose messages are
`s` bytes each way: L + s·l (ns). CPU of one stage at `r` exchanges/s:
r·(C + s·c) ns per second. Both are fitted by least squares with pure
Python (no numpy on the proxy's side), each with its R².
"""

from __future__ import annotations

import json
import math
import os
import platform as _platform
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy import __version__

PROFILE_FORMAT = 1
# The fields whose difference makes a profile describe another machine.
PLATFORM_KEYS = ("cpu_model", "kernel", "python", "pyproxy")


# Where a profile's sidecar ran: on loopback between the driver and an echo, or in a
# network-namespace pod behind iptables capture, reached from a client pod over a bridge.
LOOPBACK = "loopback"
PODS = "pods"
SETTINGS = (LOOPBACK, PODS)
# A profile's setup measured as a whole hop through two sidecars of setup NAME: `hop:NAME`.
HOP_PREFIX = "hop:"


class PlatformMismatch(Exception):
    """A profile measured on another platform was offered without --force."""


class SettingMismatch(PlatformMismatch):
    """A profile measured in another setting (loopback, pods) was offered without --force."""


@dataclass(frozen=True, slots=True)
class Linear:
    """y = base + per_byte·s (latency: ns per exchange; CPU: ns per exchange, times the rate)."""

    base: float
    per_byte: float
    r2: float = 1.0

    def at(self, size: float) -> float:
        return self.base + self.per_byte * size

    def scaled(self, factor: float) -> Linear:
        return Linear(self.base * factor, self.per_byte * factor, self.r2)

    def minus(self, other: Linear) -> Linear:
        return Linear(
            self.base - other.base, self.per_byte - other.per_byte, min(self.r2, other.r2)
        )

    def to_json(self) -> dict:
        return {"base_ns": self.base, "per_byte_ns": self.per_byte, "r2": self.r2}

    @classmethod
    def from_json(cls, data: dict) -> Linear:
        return cls(float(data["base_ns"]), float(data["per_byte_ns"]), float(data.get("r2", 1.0)))


ZERO = Linear(0.0, 0.0)


def r_squared(ys: Sequence[float], predicted: Iterable[float]) -> float:
    """The share of the variance of `ys` that `predicted` explains (1: all of it)."""
    mean = sum(ys) / len(ys)
    total = sum((y - mean) ** 2 for y in ys)
    residual = sum((y - p) ** 2 for y, p in zip(ys, predicted, strict=True))
    # A flat series fitted exactly is explained perfectly; one fitted badly is not.
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return 1.0 - residual / total


def fit_latency(sizes: Sequence[float], ns: Sequence[float]) -> Linear:
    """Least-squares L + s·l over (size, ns) points; one distinct size gives a flat line."""
    if not sizes or len(sizes) != len(ns):
        raise ValueError("need as many latency points as sizes, at least one")
    n = len(sizes)
    mean_s, mean_y = sum(sizes) / n, sum(ns) / n
    var_s = sum((s - mean_s) ** 2 for s in sizes)
    slope = (
        sum((s - mean_s) * (y - mean_y) for s, y in zip(sizes, ns, strict=True)) / var_s
        if var_s
        else 0.0
    )
    base = mean_y - slope * mean_s
    return Linear(base, slope, r_squared(ns, (base + slope * s for s in sizes)))


def fit_cpu(
    rates: Sequence[float], sizes: Sequence[float], ns_per_second: Sequence[float]
) -> Linear:
    """Least-squares r·(C + s·c) over (rate, size, CPU ns per wall second) points.

    The model has no intercept: at rate 0 the sidecar spends nothing per request.
    Fitted over rates near the one-connection maximum, it is the closed-loop cost;
    what lower rates add is the `IdleCurve`.
    """
    if not rates or not (len(rates) == len(sizes) == len(ns_per_second)):
        raise ValueError("need one rate, size and CPU figure per point, at least one")
    xs1 = list(rates)
    xs2 = [r * s for r, s in zip(rates, sizes, strict=True)]
    a11 = sum(x * x for x in xs1)
    a12 = sum(x * y for x, y in zip(xs1, xs2, strict=True))
    a22 = sum(x * x for x in xs2)
    b1 = sum(x * y for x, y in zip(xs1, ns_per_second, strict=True))
    b2 = sum(x * y for x, y in zip(xs2, ns_per_second, strict=True))
    det = a11 * a22 - a12 * a12
    if abs(det) <= 1e-12 * max(a11 * a22, 1.0):  # one size only: per-byte cost is not identifiable
        base, per_byte = (b1 / a11 if a11 else 0.0), 0.0
    else:
        base = (b1 * a22 - b2 * a12) / det
        per_byte = (a11 * b2 - a12 * b1) / det
    predicted = (base * x1 + per_byte * x2 for x1, x2 in zip(xs1, xs2, strict=True))
    return Linear(base, per_byte, r_squared(ns_per_second, predicted))


@dataclass(frozen=True, slots=True)
class StageModel:
    latency: Linear
    cpu: Linear

    def scaled(self, factor: float) -> StageModel:
        return StageModel(self.latency.scaled(factor), self.cpu.scaled(factor))

    def minus(self, other: StageModel) -> StageModel:
        """What this model costs beyond `other` (a setup less its base setup)."""
        return StageModel(self.latency.minus(other.latency), self.cpu.minus(other.cpu))

    def to_json(self) -> dict:
        return {"latency": self.latency.to_json(), "cpu": self.cpu.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> StageModel:
        return cls(Linear.from_json(data["latency"]), Linear.from_json(data["cpu"]))


@dataclass(frozen=True, slots=True)
class IdleCurve:
    """What a sidecar pass costs beyond its closed-loop cost when its exchanges come `rate` per s.

    Between two exchanges the proxy (and the CPU it ran on) goes idle, and the
    longer the gap the more the next exchange pays to wake it: scheduler
    wake-up, the CPU leaving its idle state (on a virtual machine, guest halt
    polling giving up and the vCPU being descheduled), cold caches. The cost
    rises steeply once gaps outgrow the halt-polling window and then levels
    off, a shape no one-parameter law follows, so the curve is the measured
    points, (rate /s, latency ns, CPU ns) per exchange, interpolated linearly
    in log(rate) and held flat beyond both ends; the closed-loop rate is a
    point with no extra cost.

    `gaps_ns` (one per point, when the profile recorded it) is how long the
    proxy's CPU idled before each point's exchanges: the pacing period less
    the proxied exchange's p50. A schedule that knows the idle gap before a
    pass prices it by `after_gap`, the same points on that axis: the profile
    measured the cost of an exchange that follows such a gap, not of a rate.

    `stage_ns` (one per point, when the profile recorded the stage clock at its
    paced points) is the part of each point's latency that the proxy's own
    stages took beyond the closed loop: its code running on cold caches; the
    rest is outside the stages (waking the CPU and the processes across it).
    It says where the cost goes. In the profile a sidecar's wait and its CPU's
    idling are the same gap; a schedule where other sidecars ran in the wait
    prices it with `after_gaps` and the setup's busy share (`fit_busy_share`).
    """

    points: tuple[tuple[float, float, float], ...]
    gaps_ns: tuple[float, ...] = ()
    stage_ns: tuple[float, ...] = ()

    def at(self, rate: float) -> tuple[float, float]:
        """(latency ns, CPU ns) per exchange beyond the closed loop, at this rate."""
        pts = self.points
        if not pts:
            return 0.0, 0.0
        if rate <= pts[0][0]:
            return pts[0][1], pts[0][2]
        for (r0, l0, c0), (r1, l1, c1) in zip(pts, pts[1:], strict=False):
            if rate <= r1:
                w = math.log(rate / r0) / math.log(r1 / r0)
                return l0 + w * (l1 - l0), c0 + w * (c1 - c0)
        return pts[-1][1], pts[-1][2]

    def _read(self, gap_ns: float) -> tuple[float, float, float]:
        """(latency, CPU, stage part of the latency) after an idle gap, interpolated linearly in
        log(gap) and held flat beyond both ends; without recorded gaps (an older profile) the
        gap is read as the rate 1 / gap."""
        stages = self.stage_ns or (0.0,) * len(self.points)
        if not self.gaps_ns:
            if gap_ns <= 0:
                return 0.0, 0.0, 0.0
            lat, cpu = self.at(1e9 / gap_ns)
            return lat, cpu, 0.0
        # points come in rising rate, so in falling gap
        pts = [(g, lat, cpu, st) for g, (_, lat, cpu), st
               in zip(self.gaps_ns, self.points, stages, strict=True)]  # fmt: skip
        if gap_ns >= pts[0][0]:
            return pts[0][1:]
        for p0, p1 in zip(pts, pts[1:], strict=False):
            if gap_ns >= p1[0]:
                w = math.log(p0[0] / gap_ns) / math.log(p0[0] / p1[0])
                return (p0[1] + w * (p1[1] - p0[1]), p0[2] + w * (p1[2] - p0[2]),
                        p0[3] + w * (p1[3] - p0[3]))  # fmt: skip
        return pts[-1][1:]

    def after_gap(self, gap_ns: float) -> tuple[float, float]:
        """(latency ns, CPU ns) beyond the closed loop of an exchange whose CPU idled `gap_ns`
        before it (see `_read`)."""
        lat, cpu, _ = self._read(gap_ns)
        return lat, cpu

    def after_gaps(
        self, process_gap_ns: float, cpu_gap_ns: float, busy_share: float, scale: float = 1.0
    ) -> tuple[float, float]:
        """(latency ns, CPU ns) beyond the closed loop of a pass whose sidecar waited
        `process_gap_ns` since it last ran, on a CPU that idled `cpu_gap_ns` of that wait: the
        curve at the CPU's idle gap, and `busy_share` (`fit_busy_share`) of what the curve adds
        for the rest of the sidecar's wait, when its CPU ran other work instead of idling.
        Scaled by `scale` (a whole hop's curve is shared by its two passes)."""
        idle_lat, idle_cpu = self.after_gap(cpu_gap_ns) if cpu_gap_ns > 0 else (0.0, 0.0)
        wait_lat, wait_cpu = self.after_gap(process_gap_ns) if process_gap_ns > 0 else (0.0, 0.0)
        return (scale * (idle_lat + busy_share * max(0.0, wait_lat - idle_lat)),
                scale * (idle_cpu + busy_share * max(0.0, wait_cpu - idle_cpu)))  # fmt: skip

    def to_json(self) -> list[dict]:
        gaps = self.gaps_ns or (None,) * len(self.points)
        stages = self.stage_ns or (None,) * len(self.points)
        return [{"rate": r, "latency_ns": lat, "cpu_ns": cpu} | ({"gap_ns": g} if g else {})
                | ({"stage_ns": st} if st is not None else {})
                for (r, lat, cpu), g, st in zip(self.points, gaps, stages, strict=True)]  # fmt: skip

    @classmethod
    def from_json(cls, data: list[dict]) -> IdleCurve:
        points = tuple((float(p["rate"]), float(p["latency_ns"]), float(p["cpu_ns"])) for p in data)
        gaps = tuple(float(p["gap_ns"]) for p in data if "gap_ns" in p)
        stages = tuple(float(p["stage_ns"]) for p in data if "stage_ns" in p)
        return cls(points, gaps if len(gaps) == len(points) else (),
                   stages if len(stages) == len(points) else ())  # fmt: skip


@dataclass(frozen=True, slots=True)
class Handoff:
    """What one sidecar pass costs in latency that its own stage clock does not see.

    Measured at one outstanding request as the client-side added latency less the
    stage-clock sum of the same exchanges: the hand-offs between the processes
    (the wake-up of the proxy, of the upstream and of the client again, across CPUs
    when they sit on different ones, with the scheduler's latency) and whatever the
    event loop does between its timed stages. `latency` is that gap fitted as
    L + s·l over the message sizes, with its R²; `spread_ns` the largest distance
    of a measured point from the fit.
    """

    latency: Linear
    spread_ns: float = 0.0

    def scaled(self, factor: float) -> Handoff:
        return Handoff(self.latency.scaled(factor), self.spread_ns * factor)

    def to_json(self) -> dict:
        return self.latency.to_json() | {"spread_ns": self.spread_ns}

    @classmethod
    def from_json(cls, data: dict) -> Handoff:
        return cls(Linear.from_json(data), float(data.get("spread_ns", 0.0)))


def fit_handoff(sizes: Sequence[float], gaps_ns: Sequence[float]) -> Handoff:
    """The hand-off model from (size, external latency − stage-clock sum) points."""
    line = fit_latency(sizes, gaps_ns)
    spread = max(abs(gap - line.at(s)) for s, gap in zip(sizes, gaps_ns, strict=True))
    return Handoff(line, spread)


def fit_untimed_cpu(
    rates: Sequence[float],
    sizes: Sequence[float],
    process_ns_per_s: Sequence[float],
    stage_ns_per_s: Sequence[float],
) -> Linear:
    """The sidecar's CPU that no stage times, r·(U + s·u): per (rate, size) point, its process
    CPU from /proc less its stage clock's sum, both ns per wall second. It is the event loop
    between stages, syscalls outside timed stages, the garbage collector and the kernel's work
    charged to the process; the stage models plus this line are the external CPU model."""
    return fit_cpu(
        rates, sizes, [p - s for p, s in zip(process_ns_per_s, stage_ns_per_s, strict=True)]
    )


def fit_app_cpu(
    sizes: Sequence[float], mesh_ns: Sequence[float], plain_ns: Sequence[float]
) -> Linear:
    """The CPU a sidecar pass adds to the app behind it, L + s·l ns per exchange: per size, the
    CPU per exchange of the app (the echo) behind the captured sidecar less that of the same
    app without one, both answering the same paired exchanges. The app's sends and receives
    now go through the capture's rules to a sidecar, and cost it more."""
    return fit_latency(sizes, [m - p for m, p in zip(mesh_ns, plain_ns, strict=True)])


def _falling(values: Sequence[float]) -> list[float]:
    """The closest non-increasing sequence (pool adjacent violators, equal weights): a lower rate
    never costs less per exchange, so a point that says so was disturbed, and is averaged with
    its neighbour instead of bending the curve."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [
                (blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                blocks[-1][1] + count,
            ]
    return [mean for mean, count in blocks for _ in range(int(count))]


def fit_idle_curve(
    hot_rate: float,
    paced: Sequence[tuple[float, ...]],
    spans_ns: Mapping[float, float] | None = None,
) -> IdleCurve:
    """The curve from paced (rate, extra latency ns, extra CPU ns[, extra stage-clock ns])
    points below `hot_rate`: each series made non-increasing in rate and never negative (a cost
    beyond the closed loop cannot be), with (hot_rate, 0, 0) as its last point; the stage part
    no larger than the latency. With `spans_ns` (rate -> the proxied exchange's p50 at that
    rate, the closed loop's included) each point also gets the idle gap before its exchanges,
    1 / rate − span, kept falling with rate (at least 1 µs apart)."""
    pts = sorted(tuple(p) for p in paced if 0 < p[0] < hot_rate)
    staged = all(len(p) > 3 for p in pts)
    pts.append((hot_rate, 0.0, 0.0, 0.0))
    latency = _falling([max(0.0, p[1]) for p in pts])
    cpu = _falling([max(0.0, p[2]) for p in pts])
    stage = [min(st, lat) for st, lat in
             zip(_falling([max(0.0, p[3]) for p in pts]), latency, strict=True)] if staged else []  # fmt: skip
    gaps: list[float] = []
    if spans_ns is not None and all(p[0] in spans_ns for p in pts):
        for rate, *_ in reversed(pts):
            gap = max(1000.0, 1e9 / rate - spans_ns[rate])
            gaps.append(max(gap, gaps[-1] + 1000.0) if gaps else gap)
        gaps.reverse()
    rates = [p[0] for p in pts]
    return IdleCurve(tuple(zip(rates, latency, cpu, strict=True)), tuple(gaps), tuple(stage))


def fit_busy_share(points: Sequence[Mapping]) -> float | None:
    """How much of its idle curve a setup's pass pays after waiting on a CPU that ran other work
    meanwhile, from 0 (nothing: the cost is the CPU's, waking from idle) to 1 (all of it: the
    cost is the sidecar's own, its code and data gone cold whatever ran). From a `busy` point
    (`profile.busy_points`, the most sidecars taking turns): per round, the extra CPU per call
    of K sidecars taking turns on a busy CPU and of one paced as slowly on an idle one, each
    beyond one called back to back; the ratio of their medians, held within [0, 1]. None
    without such a point; 0 when pacing added nothing (the curve is flat there anyway)."""
    busy = [p for p in points if p["kind"] == "busy"]
    if not busy:
        return None
    point = max(busy, key=lambda p: p["turns"])
    one = point["one_cpu_ns"]
    turns = statistics.median([t - o for t, o in zip(point["turns_cpu_ns"], one, strict=True)])
    paced = statistics.median([p - o for p, o in zip(point["paced_cpu_ns"], one, strict=True)])
    return 0.0 if paced <= 0 else min(1.0, max(0.0, turns / paced))


@dataclass(frozen=True)
class Profile:
    """Stage models per mode, per IPC backend (the `ipc` stage) and per filter, for one platform.

    `modes[mode]` holds the stages of a sidecar in that mode with plain TCP IPC
    and no filter; `ipc[backend]` replaces its `ipc` stage; `filters[type]` adds
    a `filter:<type>` stage. `external[mode]` is the same sidecar's cost fitted
    from outside (client latency, /proc CPU), for checking the stage clock.
    """

    platform: dict
    modes: dict[str, dict[str, StageModel]]
    ipc: dict[str, StageModel]
    filters: dict[str, StageModel]
    external: dict[str, StageModel]
    points: list[dict]
    # per setup ("http", "tcp", ...): the cost beyond the closed loop at lower rates
    idle: dict[str, IdleCurve] = field(default_factory=dict)
    # per setup: the latency of one pass that no stage times (see `Handoff`)
    handoff: dict[str, Handoff] = field(default_factory=dict)
    # per setup: the CPU per exchange that no stage times (see `fit_untimed_cpu`)
    untimed: dict[str, Linear] = field(default_factory=dict)
    setting: str = LOOPBACK
    # per setup: the share of its idle curve a pass pays after waiting on a busy CPU
    # (`fit_busy_share`); a setup without one pays its curve by its CPU's idle gap only
    busy_share: dict[str, float] = field(default_factory=dict)
    # per setup: the CPU a pass adds to the app behind the sidecar, per exchange
    # (`fit_app_cpu`): the mesh costs the app's own CPU too
    app_cpu: dict[str, Linear] = field(default_factory=dict)

    def to_json(self) -> dict:
        def models(table: dict[str, StageModel]) -> dict:
            return {name: model.to_json() for name, model in table.items()}

        return {
            "format": PROFILE_FORMAT,
            "platform": self.platform,
            "modes": {mode: models(stages) for mode, stages in self.modes.items()},
            "ipc": models(self.ipc),
            "filters": models(self.filters),
            "external": models(self.external),
            "idle": {name: curve.to_json() for name, curve in self.idle.items()},
            "handoff": {name: h.to_json() for name, h in self.handoff.items()},
            "untimed_cpu": {name: line.to_json() for name, line in self.untimed.items()},
            "setting": self.setting,
            "busy_share": self.busy_share,
            "app_cpu": {name: line.to_json() for name, line in self.app_cpu.items()},
            "points": self.points,
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format {data.get('format')!r}, expected {PROFILE_FORMAT}")

        def models(table: dict) -> dict[str, StageModel]:
            return {name: StageModel.from_json(model) for name, model in table.items()}

        return cls(
            platform=dict(data["platform"]),
            modes={mode: models(stages) for mode, stages in data["modes"].items()},
            ipc=models(data.get("ipc", {})),
            filters=models(data.get("filters", {})),
            external=models(data.get("external", {})),
            points=list(data.get("points", [])),
            idle={name: IdleCurve.from_json(c) for name, c in data.get("idle", {}).items()},
            handoff={name: Handoff.from_json(h) for name, h in data.get("handoff", {}).items()},
            untimed={name: Linear.from_json(u) for name, u in data.get("untimed_cpu", {}).items()},
            # profiles that do not say were all taken on loopback
            setting=str(data.get("setting", LOOPBACK)),
            busy_share={name: float(v) for name, v in data.get("busy_share", {}).items()},
            app_cpu={name: Linear.from_json(a) for name, a in data.get("app_cpu", {}).items()},
        )

    def external_view(self) -> Profile:
        """The same profile with each mode priced as one `sidecar` stage fitted from outside.

        A filter's external model is what its setup (`MODE+FILTER`) cost beyond the
        same mode without it. It has no hand-off or untimed CPU term: the external models
        include both.
        """
        modes = {m: {"sidecar": self.external[m]} for m in self.modes if m in self.external}
        filters = {}
        for name, model in self.external.items():
            mode, sep, kind = name.partition("+")
            # a combination of filters (`MODE+F1+F2`) is priced whole, as its own mode
            if (
                sep
                and "+" not in kind
                and not kind.startswith("ipc:")
                and not name.startswith(HOP_PREFIX)
                and mode in self.external
            ):
                filters[kind] = model.minus(self.external[mode])
        return Profile(self.platform, modes, {}, filters, self.external, self.points, self.idle,
                       setting=self.setting, busy_share=self.busy_share,
                       app_cpu=self.app_cpu)  # fmt: skip

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls.from_json(json.loads(Path(path).read_text()))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def current_platform(backends: Sequence[str] = (), codecs: Sequence[str] = ()) -> dict:
    """What a profile is only valid for: CPU, kernel, Python, pyproxy, and what was measured."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": _platform.python_version(),
        "implementation": sys.implementation.name,
        "pyproxy": __version__,
        "backends": sorted(backends),
        "codecs": sorted(codecs),
    }


def check_platform(profile: Profile, here: dict, force: bool) -> list[str]:
    """The differences between the profile's platform and this one; raise unless forced."""
    differences = [
        f"{key}: profile {profile.platform.get(key)!r}, here {here.get(key)!r}"
        for key in PLATFORM_KEYS
        if profile.platform.get(key) != here.get(key)
    ]
    if differences and not force:
        raise PlatformMismatch(
            "the profile was measured on another platform ("
            + "; ".join(differences)
            + "); re-run `pyproxy bench profile` here, or pass --force to use it anyway"
        )
    return differences


def check_setting(profile: Profile, wanted: str, force: bool) -> str | None:
    """The difference between the profile's setting and the one asked for; raise unless forced."""
    if profile.setting == wanted:
        return None
    difference = f"setting: profile {profile.setting!r}, here {wanted!r}"
    if not force:
        raise SettingMismatch(
            f"the profile was measured in the {profile.setting} setting, and this prices "
            f"sidecars in the {wanted} setting; re-run `pyproxy bench profile --setting {wanted}`, "
            "or pass --force to use it anyway"
        )
    return difference
