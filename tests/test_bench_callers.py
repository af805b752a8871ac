"""The per-area benches are callers: processes, CPU placement, peers and results have one home.

Every module in bench/ is parsed with `ast` (never imported). Outside the modules that own
a mechanism, a bench may not:

* start or run a process (`subprocess.*`, `os.system`, `os.posix_spawn`) — procs.py does;
* set CPU affinity (`os.sched_setaffinity`) — procs.py does (`pinned`, `on_cpus`,
  `move_to_cpu`);
* build a peer's command line (a list starting with nginx, haproxy, caddy, traefik,
  mitmdump, an iperf3 server, or running `-m pyproxy` / the echo, gRPC and floor servers) —
  peers.py does (an iperf3 client is a load tool, run through procs.run_tool);
* write results (`json.dump`, `csv.writer`, `csv.DictWriter`, `write_text(json.dumps(..))`,
  `write(json.dumps(..))`) — results_folder.py does.
"""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"

OWNERS = {
    "procs.py": {"process", "affinity"},  # process management and CPU placement
    "peers.py": {"peer", "config-json"},  # every peer's command line and config file
    "results_folder.py": {"results"},  # the one results writer
}

# Modules that keep a mechanism of their own, and why.
ALLOWED = {
    # The profile, validate and predict commands write model folders, not a bench run's
    # report: profile.json is the predictor's input format (model.py reads and writes it),
    # predictions.json and validation.json are what `report` reads back.
    "profile.py": {"process", "peer", "results"},
    "validate.py": {"results"},
    "cli.py": {"results"},
    "model.py": {"results"},
    # pyproxy inside a network-namespace pod (netns.Pod.popen), which a host-side launcher
    # in peers.py cannot start.
    "sockmap_echo.py": {"peer"},
    "pod_echo.py": {"peer"},
    "pod_sidecar.py": {"peer"},
    # JSON lines are its commands and answers over a pipe to the driver in a pod, not results.
    "pod_driver.py": {"results"},
}

PEER_BINARIES = {"nginx", "haproxy", "caddy", "traefik", "mitmdump"}
SERVED_MODULES = {
    "pyproxy",
    "pyproxy.bench.echo_server",
    "pyproxy.bench.python_floor",
    "pyproxy.bench.grpc_bench",
}
PROCESS_CALLS = {
    ("subprocess", "Popen"),
    ("subprocess", "run"),
    ("subprocess", "call"),
    ("subprocess", "check_call"),
    ("subprocess", "check_output"),
    ("os", "system"),
    ("os", "posix_spawn"),
}
RESULT_CALLS = {("json", "dump"), ("csv", "writer"), ("csv", "DictWriter")}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _is_json_dumps(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp):  # json.dumps(...) + "\n"
        return _is_json_dumps(node.left)
    return isinstance(node, ast.Call) and _dotted(node.func) == ("json", "dumps")


def _peer_argv(node: ast.List) -> bool:
    values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
    if values and isinstance(values[0], str) and values[0] in PEER_BINARIES:
        return True
    if values[:1] == ["iperf3"] and "-s" in values:
        return True
    return any(a == "-m" and b in SERVED_MODULES for a, b in zip(values, values[1:], strict=False))


def violations(source: str) -> dict[str, list[int]]:
    """Mechanism -> the lines where this module uses it."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(source)):
        kind = None
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in PROCESS_CALLS:
                kind = "process"
            elif name == ("os", "sched_setaffinity"):
                kind = "affinity"
            elif name in RESULT_CALLS:
                kind = "results"
            elif (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("write_text", "write")
                and node.args
                and _is_json_dumps(node.args[0])
            ):
                kind = "config-json"
        elif isinstance(node, ast.List) and _peer_argv(node):
            kind = "peer"
        if kind:
            found.setdefault(kind, []).append(node.lineno)
    # A JSON document written to a file is a result unless the module writes configs.
    if "config-json" in found:
        found.setdefault("results", []).extend(found.pop("config-json"))
    return found


def test_only_the_owning_modules_start_processes_pin_cpus_launch_peers_or_write_results():
    problems = []
    for path in sorted(BENCH.glob("*.py")):
        allowed = OWNERS.get(path.name, set()) | ALLOWED.get(path.name, set())
        if "config-json" in allowed:
            allowed |= {"results"}
        for kind, lines in violations(path.read_text()).items():
            if kind not in allowed:
                problems.append(f"bench/{path.name}: {kind} at lines {lines}")
    assert not problems, "\n".join(problems)


def test_the_check_sees_each_mechanism():
    """The checker itself, on code a per-area bench used to carry."""
    source = """
import json, os, subprocess, sys
subprocess.Popen(["nginx", "-c", "x.conf"])
os.sched_setaffinity(0, {0})
argv = [sys.executable, "-m", "pyproxy.bench.echo_server", "--listen", "127.0.0.1:1"]
out.write_text(json.dumps(result, indent=2))
"""
    found = violations(source)
    assert set(found) == {"process", "affinity", "peer", "results"}
    assert sorted(found["peer"]) == [3, 5]


def test_allowlist_entries_are_still_needed():
    """An allowlisted module that no longer uses what it is allowed is dropped from the list."""
    stale = []
    for name, kinds in ALLOWED.items():
        used = set(violations((BENCH / name).read_text()))
        stale += [f"{name}: {kind}" for kind in kinds - used]
    assert not stale, stale
