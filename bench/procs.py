"""Process management and CPU placement for the demo and every benchmark: free ports,
readiness, starting and stopping processes (pinned or not), running a load tool, CPU time.

The only module in bench/ that starts processes or sets CPU affinity; every bench goes
through it (tests/test_bench_callers.py checks).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

_handed_out: set[int] = set()

# Where the ports of one of several test processes running at once come from (pytest-xdist's
# workers: PYTEST_XDIST_WORKER=gwN of PYTEST_XDIST_WORKER_COUNT): a block of its own below the
# kernel's ephemeral range. A port found free is bound by its user a moment later (a proxy
# starting up); meanwhile the kernel could give it to another process's socket bound to port 0
# or connecting out, which it numbers from the ephemeral range only, and another worker's search
# could find it free too.
PORT_BLOCKS_FROM = 10_000
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


@functools.cache  # a process's worker index and the ephemeral range do not change while it runs
def _port_block() -> range | None:
    """This process's own ports, or None: take any the kernel gives."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index, count = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        ephemeral_from = int(Path(EPHEMERAL_RANGE).read_text().split()[0])
    except (KeyError, OSError, ValueError, IndexError):
        return None
    size = (ephemeral_from - PORT_BLOCKS_FROM) // max(count, 1)
    if not 0 <= index < count or size < 100:
        return None  # not one of the workers, or no room below the range: as a single process
    start = PORT_BLOCKS_FROM + index * size
    return range(start, start + size)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now that this process has not handed out before: the kernel
    may give a just-closed port again, and callers often take several before binding any.
    Among parallel test workers, from this worker's block (_port_block), from a random place in
    it: the processes a worker starts search its block too, and must not all begin with the
    ports it handed out and has yet to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    block = _port_block()
    first = random.randrange(len(block)) if block else 0
    for attempt in range(100):
        port = block[(first + attempt) % len(block)] if block else 0
        if port in _handed_out:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # bound by someone: the next one
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no port on {host} that was not handed out already")


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts on host:port (raise after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """argv run on one CPU (taskset), or as is when no CPU is given or taskset is missing."""
    return (
        ["taskset", "-c", str(cpu), *argv] if cpu is not None and shutil.which("taskset") else argv
    )


def realtime(argv: list[str]) -> list[str]:
    """argv run SCHED_FIFO at the lowest priority (chrt): no task of the ordinary class it wakes
    can preempt it, so a call it times ends when its syscall does. A diagnostic, not a
    placement to deploy: while it runs, the ordinary tasks on its CPU wait."""
    if not shutil.which("chrt"):
        raise RuntimeError("chrt (util-linux) is needed to run a process SCHED_FIFO")
    return ["chrt", "-f", "1", *argv]


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def halt_poll_ns() -> int | None:
    """How long an idle vCPU polls before it halts (the guest haltpoll cpuidle governor's
    guest_halt_poll_ns); None when the kernel does not use that governor."""
    try:
        return int(Path(HALT_POLL).read_text())
    except (OSError, ValueError):
        return None


def add_halt_poll_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--halt-poll-ns", type=int, metavar="NS",
        help="idle vCPUs poll NS ns before halting during the run (the haltpoll governor's "
        "guest_halt_poll_ns, restored after; the kernel's default is 200000): a halted vCPU's "
        "wake-up costs its waker a VM exit inside the syscall that woke it",
    )  # fmt: skip


def halt_poll_refused(ns: int | None) -> str | None:
    """Why `--halt-poll-ns ns` cannot be honoured here (None: it can, or was not asked for)."""
    if ns is None:
        return None
    if halt_poll_ns() is None:
        return f"--halt-poll-ns needs the haltpoll cpuidle governor ({HALT_POLL})"
    return "--halt-poll-ns must be 0 or more" if ns < 0 else None


@contextlib.contextmanager
def halt_polling(ns: int | None) -> Iterator[int | None]:
    """With `ns`, idle vCPUs poll that long before halting while the block runs (restored after).
    A halted vCPU is woken by an IPI, a VM exit its waker pays inside the syscall that woke it
    (tens of µs a round trip on some VMs); a polling one notices the wake-up without one. The
    kernel's default is 200 µs; a VM may boot with 0 (as this project's does). Yields the value
    in effect (None: no haltpoll governor, and `ns` must then be None)."""
    if refused := halt_poll_refused(ns):
        raise RuntimeError(refused)  # the benches ask halt_poll_refused first and say it plainly
    before = halt_poll_ns()
    if ns is None:
        yield before
        return
    Path(HALT_POLL).write_text(str(ns))
    try:
        yield halt_poll_ns()  # read back: what the kernel took
    finally:
        Path(HALT_POLL).write_text(str(before))


def move_to_cpu(pids: list[int], cpu: int) -> None:
    """Every thread of the running processes onto one CPU (a proxy alone under load)."""
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


def shield(pids: list[int]) -> bool:
    """Every thread of the running processes SCHED_FIFO at the lowest priority, ahead of the
    machine's other (ordinary) tasks; threads and processes they start later inherit it. A
    process pinned to a CPU cannot leave it when another user's task runs there, and a woken
    ordinary task may wait out that task's slice (milliseconds): pinned and shielded, the CPU
    is the bench's while it has work, as pinning means. False where the kernel refuses."""
    done = True
    for _pid, tid in _threads(pids):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(1))
        except ProcessLookupError:
            pass
        except OSError:
            done = False
    return done


@contextlib.contextmanager
def on_cpus(cpus: set[int] | int | None) -> Iterator[None]:
    """This process (the client, the driver) on the given CPUs for the block, then back."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, {cpus} if isinstance(cpus, int) else cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def speed_probe(cpus: tuple[int, ...] = (0, 1), rounds: int = 5) -> dict[int, float]:
    """How fast each CPU runs a fixed piece of Python now: the fastest of `rounds` runs, in µs.
    The same code was seen to take 1.5-2x as long in some few-minute stretches as in others,
    with nothing else running in the machine; a bench that reads this beside its phases can
    tell such a stretch from a change in what it measures."""
    out = {}
    for cpu in cpus:
        if cpu >= (os.cpu_count() or 1):
            continue
        with on_cpus(cpu):
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                total = 0
                for i in range(20_000):
                    total += i * i
                best = min(best, (time.perf_counter_ns() - t0) / 1000)
        out[cpu] = best
    return out


def run_tool(
    argv: list[str], cpu: int | None = None, timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess:
    """A load generator or helper command (wrk, h2load, iperf3 -c, pip) to completion, pinned
    to `cpu` when given; its output captured as text."""
    return subprocess.run(pinned(cpu, argv), capture_output=True, text=True, timeout=timeout,
                          check=check)  # fmt: skip


def get_json(url: str) -> dict:
    """A JSON document over HTTP (an admin server's /stats)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """The process and its descendants (from /proc/*/stat parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _threads(pids: list[int]) -> Iterator[tuple[int, str]]:
    """(pid, tid) of every thread of the processes still running."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            yield pid, tid


def run_delay_ns(pids: list[int]) -> int:
    """How long the processes' threads waited, runnable, for a CPU (schedstat), in ns: time a
    timed call can include when the task it woke runs first. 0 without schedstat."""
    total = 0
    for pid, tid in _threads(pids):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_ns(pids: list[int]) -> int:
    """CPU time the processes' threads have run, in ns (schedstat): clock ticks (10 ms) would
    round a short phase's few ms to nothing. Ticks from /proc/<pid>/stat where schedstat is
    missing (a kernel without CONFIG_SCHEDSTATS)."""
    total = 0
    for pid, tid in _threads(pids):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            total += _ticks_ns(pid, tid)
        except (OSError, ValueError, IndexError):
            pass
    return total


def preemptions(pids: list[int]) -> int:
    """How often the processes' threads were preempted (nonvoluntary_ctxt_switches): taken off
    their CPU while runnable, e.g. by the task a send of theirs woke."""
    total = 0
    for pid, tid in _threads(pids):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _ticks_ns(pid: int, tid: str) -> int:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (all threads) of the given processes, in seconds at ns resolution."""
    return cpu_ns(pids) / 1e9


def foreign_cpu() -> dict[int, int]:
    """CPU ticks of every process outside this bench's own tree (other users of the machine)."""
    ours = set(tree_pids(os.getpid()))
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in ours:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(entry)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return out


class Noise:
    """How much CPU the rest of the machine took while a phase ran (in CPUs, 2.0 = both busy)."""

    def __init__(self) -> None:
        self.t0, self.before = time.monotonic(), foreign_cpu()

    def cpus(self) -> float:
        after = foreign_cpu()
        ticks = sum(after[pid] - self.before[pid] for pid in after if pid in self.before)
        return ticks / CLK_TCK / max(time.monotonic() - self.t0, 1e-9)


def noise_note(foreign_cpus: dict[str, float]) -> str:
    """A report's line on how busy the rest of the machine was in each phase (from Noise)."""
    quiet = max(foreign_cpus.values(), default=0.0) <= 0.1
    return (
        f"CPU taken by other processes on the machine while phases ran (CPUs of {os.cpu_count()}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in foreign_cpus.items())
        + ("" if quiet else " — **the machine was not quiet; rates are disturbed**")
    )


class Processes:
    """Background processes (and their children) that are always stopped, whatever happens.

    With `logs`, `launch(name, ...)` writes each process's output to
    `logs/<name>.log` and runs it there (what a results folder keeps).
    """

    def __init__(self, logs: Path | None = None) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], quiet: bool = True, cpu: int | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start `argv` (on `cpu` when given: taskset execs it in place, the pid is its own)."""
        argv = pinned(cpu, argv)
        if quiet:
            kwargs.setdefault("stdout", subprocess.DEVNULL)
            kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def launch(
        self, name: str, argv: list[str], env: dict | None = None, cpu: int | None = None
    ) -> subprocess.Popen:
        """Start `argv` with its output in the log folder (or discarded without one)."""
        environ = {**os.environ, **(env or {})}
        if self.logs is None:
            return self.start(argv, env=environ, cpu=cpu)
        with open(self.logs / f"{name}.log", "wb") as log:
            return self.start(argv, quiet=False, stdout=log, stderr=subprocess.STDOUT, env=environ,
                              cwd=self.logs, cpu=cpu)  # fmt: skip

    def stop_all(self) -> None:
        children = {proc.pid: tree_pids(proc.pid) for proc in self.procs}
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pid in children[proc.pid][1:]:  # workers a server forked (proxy.py, pyproxy)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()


def cell(value, fmt: str = ".1f") -> str:
    """A report table cell: the number, or a dash where nothing was measured."""
    return "—" if value is None else format(value, fmt)


def target_line(met: bool, target: str, measured: str) -> str:
    """One line a reader (or grep) finds at the end of a bench's report: a target, met or not."""
    return f"TARGET {'MET    ' if met else 'NOT MET'}  {target}: {measured}"


REPO = Path(__file__).resolve().parent.parent


def git_state(repo: Path = REPO) -> dict:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "dirty_files": dirty.splitlines()}


def add_baseline_tree(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline-tree", metavar="PATH",
                        help="another checkout with its own venv (make .venv/.installed-test "
                        "there): its pyproxy runs beside this one, before_<name>")  # fmt: skip


def baseline_tree_python(parser: argparse.ArgumentParser, args) -> Path | None:
    """The --baseline-tree checkout's interpreter (None without one); a usage error if unbuilt."""
    if args.baseline_tree is None:
        return None
    python = Path(args.baseline_tree).resolve() / ".venv" / "bin" / "python"
    if not python.exists():
        parser.error(f"{python} missing: run `make .venv/.installed-test` in "
                     f"{args.baseline_tree} (it builds that tree's native modules too)")  # fmt: skip
    return python
