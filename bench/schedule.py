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
between processes) take time on no resource. When several tasks could start
at once, a process going on without having waited (it held its CPU) goes
first, then the one that has run least in this request, as a fair scheduler
runs the waiting thread that has had the least CPU: a fan-out's later
callee, woken for its call, works before the caller, which has run longest,
takes an earlier callee's answer (the validation apps' traces show that
order, for grpcio and asyncio services alike).

A call's tasks, in order: the caller's app sends it (half its `client_ns`),
the caller's sidecar (outbound) and the callee's sidecar (inbound) each pass
the request, then the callee's app takes the call (half its `app_ns`) and
works, its child groups run (the calls of one group start together, the next
group when they all ended), the app answers (the other half), the two
sidecars pass the response back, and the caller's app takes the answer (the
other half of `client_ns`). A caller's client work for one call of a
parallel group is that call's alone: the first call's passes can run while
the caller still sends the second, as its grpcio or HTTP client sends them
one after the other. A sidecar
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


# What waking a sidecar costs: (the gap since its process last ran, the part of it its CPU
# idled; ns) -> (latency ns, CPU ns), the profile's IdleCurve read on its gap axis
# (`IdleCurve.after_gaps`).
Wake = Callable[[float, float], tuple[float, float]]


@dataclass(frozen=True, slots=True)
class HopCost:
    """One call's sidecar passes (ns per exchange) and the delays between them."""

    outbound_ns: float = 0.0  # the caller's sidecar (0: none)
    inbound_ns: float = 0.0  # the callee's sidecar (0: none)
    delay_ns: float = 0.0  # hand-off and wake-ups: latency on no CPU
    # with these, a pass also pays for its process's wait since it last ran and its CPU's idling
    outbound_wake: Wake | None = None
    inbound_wake: Wake | None = None


@dataclass(slots=True)
class _Task:
    duration: float
    resources: tuple[object, ...]
    after: list[int] = field(default_factory=list)
    wake: Wake | None = None


class _Plan:
    def __init__(self, placement: Placement) -> None:
        self.tasks: list[_Task] = []
        self.placement = placement
        self.wake_cpu_ns = 0.0  # what the wake-ups cost in CPU, over the last run

    def add(self, duration: float, process: Process | None, after: list[int],
            wake: Wake | None = None) -> int:  # fmt: skip
        resources: tuple[object, ...] = ()
        if process is not None and duration > 0:
            cpu = self.placement.cpu(process)
            resources = (process,) if cpu is None else (process, ("cpu", cpu))
        self.tasks.append(_Task(duration, resources, after, wake))
        return len(self.tasks) - 1

    def call(self, graph: CallGraph, call: Call, caller: str | None, start: int,
             costs: Callable[[Call], HopCost]) -> int:  # fmt: skip
        """Add `call`'s tasks after task `start`; return the task that ends it."""
        cost = costs(call)
        out = ("sidecar", caller) if caller is not None else None
        client = ("app", caller) if caller is not None else None
        inbound = ("sidecar", call.callee)
        half_out, half_in = cost.outbound_ns / 2, cost.inbound_ns / 2
        t = self.add(call.client_ns / 2, client, [start])
        t = self.add(half_out, out, [t], cost.outbound_wake)
        t = self.add(cost.delay_ns / 2, None, [t])
        t = self.add(half_in, inbound, [t], cost.inbound_wake)
        t = self.add(call.network_ns, None, [t])
        app = ("app", call.callee)
        t = self.add(call.app_ns / 2 + call.work_ns, app, [t])
        groups: dict[int, list[Call]] = {}
        for child in call.children:
            groups.setdefault(child.group, []).append(child)
        for index in sorted(groups):
            ends = [self.call(graph, child, call.callee, t, costs) for child in groups[index]]
            t = self.add(0.0, None, ends)
        t = self.add(call.app_ns / 2, app, [t])
        t = self.add(half_in, inbound, [t], cost.inbound_wake)
        t = self.add(cost.delay_ns / 2, None, [t])
        t = self.add(half_out, out, [t], cost.outbound_wake)
        return self.add(call.client_ns / 2, client, [t])

    def run(self, free: dict[object, float] | None = None) -> tuple[float, dict[object, float]]:
        """The time the last task ends, scheduled earliest-startable first, and when each
        resource was last busy. `free`: when each resource was last busy before the request
        (negative: in the previous one); a pass whose process waited since pays to wake it."""
        end = [0.0] * len(self.tasks)
        free = dict(free or {})
        shared_cpu = {r for task in self.tasks for r in task.resources if isinstance(r, tuple)
                      and r[0] == "cpu"}  # fmt: skip
        self.wake_cpu_ns = 0.0
        done = [False] * len(self.tasks)
        waiting = set(range(len(self.tasks)))
        ran: dict[object, float] = {}  # each process's busy time so far in this request
        last: dict[object, object] = {}  # the process each shared CPU ran last

        def turn(i: int, start: float) -> tuple[int, float]:
            """Who goes first of tasks that could start at once: a process going on without
            having waited (its task before ended now, and it held its CPU: it never yielded),
            then the one that has run least."""
            resources = self.tasks[i].resources
            if not resources:
                return (0, 0.0)
            process = resources[0]
            cpu = resources[1] if len(resources) > 1 else None
            going_on = cpu is not None and last.get(cpu) == process and free.get(process) == start
            return (0 if going_on else 1, ran.get(process, 0.0))

        while waiting:
            best, best_start, best_turn = -1, 0.0, (0, 0.0)
            for i in sorted(waiting):
                task = self.tasks[i]
                if not all(done[j] for j in task.after):
                    continue
                ready = max((end[j] for j in task.after), default=0.0)
                start = max([ready] + [free.get(r, 0.0) for r in task.resources])
                if best < 0 or start < best_start:
                    best, best_start, best_turn = i, start, turn(i, start)
                elif start == best_start and (mine := turn(i, start)) < best_turn:
                    best, best_turn = i, mine
            task = self.tasks[best]
            duration = task.duration
            cpu = next((r for r in task.resources if r in shared_cpu), None)
            process = task.resources[0] if task.resources else None
            if task.wake is not None and process in free:
                # The whole wake-up falls on the half that follows the process's own gap: the
                # profile's paced exchange paid its curve's cost after one long gap (before its
                # request), its answer following the echo's short work as in the closed loop.
                # Both gaps count: the CPU's idling (waking it) and the process's own wait (its
                # code and data gone cold, even while the CPU ran other sidecars).
                gap = best_start - free[process]
                cpu_gap = min(gap, best_start - free[cpu]) if cpu in free else gap
                if gap > 0:
                    wake_ns, wake_cpu = task.wake(gap, max(cpu_gap, 0.0))
                    duration += wake_ns
                    self.wake_cpu_ns += wake_cpu
            end[best] = best_start + duration
            for r in task.resources:
                free[r] = end[best]
            if task.resources:
                ran[task.resources[0]] = ran.get(task.resources[0], 0.0) + duration
                if cpu is not None:
                    last[cpu] = task.resources[0]
            done[best] = True
            waiting.remove(best)
        return max(end, default=0.0), free


def latency(
    graph: CallGraph,
    placement: Placement,
    costs: Callable[[Call], HopCost],
    period_ns: float = 0.0,
) -> tuple[float, float]:
    """One request's latency (ns) through the graph, its processes placed on shared CPUs, and
    the CPU (ns) its sidecars' wake-ups cost. With `period_ns` (one request every that many ns),
    each process and CPU waits from its last task of one request to its first of the next, and
    a pass pays the wake-up its costs price for its sidecar's wait and its CPU's idling."""
    plan = _Plan(placement)
    start = plan.add(0.0, None, [])
    plan.call(graph, graph.root, None, start, costs)
    if not period_ns:
        return plan.run()[0], 0.0
    # the previous request, as this one: each resource last busy one period before its last task
    _, free = plan.run()
    total, _ = plan.run({r: t - period_ns for r, t in free.items()})
    return total, plan.wake_cpu_ns
