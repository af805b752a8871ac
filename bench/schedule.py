"""The latency of one request through a call tree whose processes share CPUs: a list schedule.

Without a placement, a call tree's latency is its critical path: parallel
calls overlap fully. When processes are placed on shared CPUs (`validate
--pin` puts every app on CPU 0 and every sidecar on CPU 1) they do not: two
parallel calls' apps take turns on their CPU, and a sidecar's pass for one
call waits while the same CPU runs another call's pass, yet runs beside the
apps' work on the other CPU. This module prices that: each piece of work is
a task on its process and its CPU, each a serial resource (one event loop,
one CPU); a task starts once the tasks it follows have ended and both its
resources are free, the earliest startable first (a non-delay list
schedule, as a run-to-completion event loop and a scheduler without
preemption between short tasks behave); delays (the network, wake-ups
between processes) take time on no resource.

A call's tasks, in order: the caller's sidecar (outbound) and the callee's
sidecar (inbound) each pass the request, then the callee's app works, its
child groups run (the calls of one group start together, the next group
when they all ended), and the two sidecars pass the response back. A sidecar
pass's per-exchange cost is split evenly between its request and its
response half; so is the hop's hand-off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pyproxy.bench.callgraph import Call, CallGraph

# What a process is called in a placement: ("app", service) or ("sidecar", service).
Process = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Placement:
    """Which CPU each process runs on (None: a CPU of its own, shared with no one)."""

    apps: int | None = None
    sidecars: int | None = None

    def cpu(self, process: Process) -> int | None:
        return self.apps if process[0] == "app" else self.sidecars

    @property
    def shared(self) -> bool:
        return self.apps is not None or self.sidecars is not None


# every process on a CPU of its own; and `validate --pin`'s placement
UNPLACED = Placement()
PINNED = Placement(apps=0, sidecars=1)


@dataclass(frozen=True, slots=True)
class HopCost:
    """One call's sidecar passes (ns per exchange) and the delays between them."""

    outbound_ns: float = 0.0  # the caller's sidecar (0: none)
    inbound_ns: float = 0.0  # the callee's sidecar (0: none)
    delay_ns: float = 0.0  # hand-off and wake-ups: latency on no CPU


@dataclass(slots=True)
class _Task:
    duration: float
    resources: tuple[object, ...]
    after: list[int] = field(default_factory=list)


class _Plan:
    def __init__(self, placement: Placement) -> None:
        self.tasks: list[_Task] = []
        self.placement = placement

    def add(self, duration: float, process: Process | None, after: list[int]) -> int:
        resources: tuple[object, ...] = ()
        if process is not None and duration > 0:
            cpu = self.placement.cpu(process)
            resources = (process,) if cpu is None else (process, ("cpu", cpu))
        self.tasks.append(_Task(duration, resources, after))
        return len(self.tasks) - 1

    def call(self, graph: CallGraph, call: Call, caller: str | None, start: int,
             costs: Callable[[Call], HopCost]) -> int:  # fmt: skip
        """Add `call`'s tasks after task `start`; return the task that ends it."""
        cost = costs(call)
        out = ("sidecar", caller) if caller is not None else None
        inbound = ("sidecar", call.callee)
        t = self.add(cost.outbound_ns / 2, out, [start])
        t = self.add(cost.delay_ns / 2, None, [t])
        t = self.add(cost.inbound_ns / 2, inbound, [t])
        t = self.add(call.network_ns, None, [t])
        t = self.add(call.work_ns, ("app", call.callee), [t])
        groups: dict[int, list[Call]] = {}
        for child in call.children:
            groups.setdefault(child.group, []).append(child)
        for index in sorted(groups):
            ends = [self.call(graph, child, call.callee, t, costs) for child in groups[index]]
            t = self.add(0.0, None, ends)
        t = self.add(cost.inbound_ns / 2, inbound, [t])
        t = self.add(cost.delay_ns / 2, None, [t])
        return self.add(cost.outbound_ns / 2, out, [t])

    def run(self) -> float:
        """The time the last task ends, scheduled earliest-startable first."""
        end = [0.0] * len(self.tasks)
        free: dict[object, float] = {}
        done = [False] * len(self.tasks)
        waiting = set(range(len(self.tasks)))
        while waiting:
            best, best_start = -1, 0.0
            for i in sorted(waiting):
                task = self.tasks[i]
                if not all(done[j] for j in task.after):
                    continue
                ready = max((end[j] for j in task.after), default=0.0)
                start = max([ready] + [free.get(r, 0.0) for r in task.resources])
                if best < 0 or start < best_start:
                    best, best_start = i, start
            task = self.tasks[best]
            end[best] = best_start + task.duration
            for r in task.resources:
                free[r] = end[best]
            done[best] = True
            waiting.remove(best)
        return max(end, default=0.0)


def latency(graph: CallGraph, placement: Placement, costs: Callable[[Call], HopCost]) -> float:
    """One request's latency (ns) through the graph, its processes placed on shared CPUs."""
    plan = _Plan(placement)
    start = plan.add(0.0, None, [])
    plan.call(graph, graph.root, None, start, costs)
    return plan.run()
