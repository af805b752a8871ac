"""`pyproxy bench validate`: predicted vs measured overhead of a small multi-service application.

The application (`validation_app.py`, HTTP/1.1 services calling each other)
runs twice at once: without sidecars, and with a pyproxy sidecar in front of
every service (inbound) and between each caller and its callee (outbound),
as standalone listeners (no capture, no namespaces). Rounds interleave the
two. Measured: p50 latency overhead (with − without, one outstanding
request) and the sidecars' CPU at a paced rate. Predicted: `predict` on the
same call graph with the profile's stage models and, separately, with its
external (whole-sidecar) models; and, "from traces", on the call graphs
built from the OpenTelemetry traces the app exports when it runs again with
tracing on (20 requests; the median of their predictions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyproxy.bench.callgraph import Service, graph_from_data, graphs_from_traces, read_otlp_lines
from pyproxy.bench.driver import HttpExchanger, drive, wait_ready
from pyproxy.bench.model import Profile, check_platform, current_platform
from pyproxy.bench.predict import predict
from pyproxy.bench.procs import Processes, cpu_seconds, free_port, tree_pids

RESULTS = Path(__file__).resolve().parent / "results"
TOPOLOGIES = {
    # service -> (downstream services, parallel?)
    "chain": {"a": (["b"], False), "b": ([], False)},
    "fanout": {"a": (["b", "c"], True), "b": ([], False), "c": ([], False)},
}


@dataclass
class Deployment:
    entry: str
    sidecar_pids: list[int]


def deploy(
    procs: Processes, topology: str, mode: str | None, work_us: float, trace: Path | None = None
) -> Deployment:
    """Start the services (leaves first); with a mode, a sidecar pair on every call."""
    services = TOPOLOGIES[topology]
    inbound: dict[str, str] = {}
    sidecars: list[int] = []

    def proxy(upstream: str) -> str:
        port = free_port()
        proc = procs.start([sys.executable, "-m", "pyproxy", "run", "--mode", str(mode), "--listen",
                            f"127.0.0.1:{port}", "--upstream", upstream, "--admin", "off",
                            "--log-level", "warning"])  # fmt: skip
        sidecars.append(proc.pid)
        wait_ready("http", f"127.0.0.1:{port}")  # its upstream is up: leaves start first
        return f"127.0.0.1:{port}"

    for name in sorted(services, key=lambda s: len(services[s][0])):
        downstream, parallel = services[name]
        calls = [proxy(inbound[d]) if mode else inbound[d] for d in downstream]  # outbound sidecars
        app = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "pyproxy.bench.validation_app", "--listen", app,
                "--work-us", str(work_us), "--name", name]  # fmt: skip
        if trace is not None:
            argv += ["--trace", str(trace)]
        for call in calls:
            argv += ["--call", call]
        if parallel:
            argv.append("--parallel")
        procs.start(argv)
        wait_ready("http", app)
        inbound[name] = proxy(app) if mode else app
    entry = inbound["a"]
    wait_ready("http", entry)
    return Deployment(entry, [p for root in sidecars for p in tree_pids(root)])


def graph_for(topology: str, mode: str, size: int, rate: float, work_us: float):
    services = TOPOLOGIES[topology]
    calls = [
        {
            "id": "a",
            "callee": "a",
            "request": size,
            "response": size,
            "rate": rate,
            "work_us": work_us,
        }
    ]
    for d in services["a"][0]:
        calls.append({"id": d, "parent": "a", "callee": d, "request": size, "response": size,
                      "group": 0 if services["a"][1] else len(calls), "work_us": work_us})  # fmt: skip
    return graph_from_data({"name": f"{topology}/{mode}", "services": {s: {"mode": mode} for s in services},
                            "calls": calls})  # fmt: skip


def traced_graphs(
    topology: str,
    mode: str,
    size: int,
    work_us: float,
    rate: float,
    folder: Path,
    requests: int = 20,
) -> list:
    """The app run once more with OpenTelemetry on, and the call graphs its traces describe."""
    trace = folder / f"traces-{topology}-{mode}.jsonl"
    procs = Processes()
    try:
        entry = deploy(procs, topology, None, work_us, trace).entry
        client = HttpExchanger(entry, size)
        client.exchange()  # connections and thread pools set up
        trace.write_text("")  # neither that nor the readiness probes are the workload
        for _ in range(requests):
            client.exchange()
        client.close()
    finally:
        procs.stop_all()
    overlay = {s: Service(s, mode) for s in TOPOLOGIES[topology]}  # the sidecars' mode
    graphs = graphs_from_traces(read_otlp_lines(trace), str(trace), overlay)
    for graph in graphs:
        graph.root.rate = rate
    return graphs


def measure(case: dict, rounds: int, seconds: float, size: int) -> dict:
    """p50s interleaved; then the sidecars' CPU at half the with-sidecar maximum rate."""
    plain, meshed = (
        HttpExchanger(case["plain"].entry, size),
        HttpExchanger(case["mesh"].entry, size),
    )
    try:
        without: list[int] = []
        with_: list[int] = []
        for _ in range(rounds):
            without += drive(plain, seconds, warmup=20)
            with_ += drive(meshed, seconds, warmup=20)
        rate = 0.5 * 1e9 / statistics.fmean(with_)
        pids = case["mesh"].sidecar_pids
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        done = drive(meshed, seconds * rounds, rate=rate, warmup=0)
        wall = time.monotonic() - t0
        return {
            "p50_without_us": statistics.median(without) / 1000,
            "p50_with_us": statistics.median(with_) / 1000,
            "overhead_us": (statistics.median(with_) - statistics.median(without)) / 1000,
            "rate": len(done) / wall,
            "sidecar_cores": (cpu_seconds(pids) - cpu0) / wall,
        }
    finally:
        plain.close()
        meshed.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="use a profile from another platform")
    parser.add_argument("--modes", default="tcp,http")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--work-us", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path)


def _error(predicted: float, measured: float) -> float | None:
    return abs(predicted - measured) / abs(measured) if measured else None


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    try:
        check_platform(profile, current_platform(), args.force)
    except Exception as exc:  # PlatformMismatch: say why, as predict does
        print(f"pyproxy bench validate: {exc}", file=sys.stderr)
        return 2
    external = profile.external_view()
    out = args.out or RESULTS / time.strftime("validate-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "inputs.json").write_text(
        json.dumps({k: str(v) for k, v in vars(args).items() if k != "func"}, indent=2)
    )
    rows = []
    try:
        for topology in args.topologies.split(","):
            for mode in args.modes.split(","):
                procs = Processes()
                try:
                    case = {"plain": deploy(procs, topology, None, args.work_us),
                            "mesh": deploy(procs, topology, mode, args.work_us)}  # fmt: skip
                    m = measure(case, args.rounds, args.seconds, args.size)
                finally:
                    procs.stop_all()
                graph = graph_for(topology, mode, args.size, m["rate"], args.work_us)
                by_stage, whole = predict(profile, graph), predict(external, graph)
                from_traces = [
                    predict(profile, g).overhead_ns / 1000
                    for g in traced_graphs(topology, mode, args.size, args.work_us, m["rate"], out)
                ]
                row = {"topology": topology, "mode": mode, **m,
                       "predicted_us": by_stage.overhead_ns / 1000,
                       "predicted_external_us": whole.overhead_ns / 1000,
                       "predicted_cores": by_stage.cpu_cores,
                       "predicted_external_cores": whole.cpu_cores,
                       "predicted_from_traces_us": statistics.median(from_traces),
                       "traces": len(from_traces)}  # fmt: skip
                row["error"] = _error(row["predicted_us"], m["overhead_us"])
                row["error_external"] = _error(row["predicted_external_us"], m["overhead_us"])
                row["cpu_error_external"] = _error(
                    row["predicted_external_cores"], m["sidecar_cores"]
                )
                rows.append(row)
                print(f"  validate: {topology}/{mode} done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("pyproxy bench validate: interrupted; writing what was measured", file=sys.stderr)
    (out / "validation.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (out / "table.md").write_text(text)
    if rows:
        from pyproxy.bench.plots import predicted_vs_measured

        predicted_vs_measured(
            {"stage models": [(r["overhead_us"], r["predicted_us"]) for r in rows],
             "external models": [(r["overhead_us"], r["predicted_external_us"]) for r in rows]},
            out / "predicted_vs_measured.png",
        )  # fmt: skip
    print(text)
    print(f"results: {out}")
    return 0


def table(rows: list[dict]) -> str:
    def pct(e: float | None) -> str:
        return "–" if e is None else f"{e * 100:.0f} %"

    lines = [
        "| app | sidecars | measured overhead µs | predicted (stages) µs | error | from traces µs | predicted (external) µs | error "
        "| sidecar CPU cores at rate | predicted (external) | error |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['topology']} | {r['mode']} | {r['overhead_us']:.1f} | {r['predicted_us']:.1f} | {pct(r['error'])} "
            f"| {r['predicted_from_traces_us']:.1f} "
            f"| {r['predicted_external_us']:.1f} | {pct(r['error_external'])} "
            f"| {r['sidecar_cores']:.3f} @ {r['rate']:.0f}/s | {r['predicted_external_cores']:.3f} | {pct(r['cpu_error_external'])} |"
        )
    errors = sorted(r["error"] for r in rows if r["error"] is not None)
    ext = sorted(r["error_external"] for r in rows if r["error_external"] is not None)
    if errors:
        lines.append(f"\nmedian / worst absolute error: stage models {statistics.median(errors) * 100:.0f} % / "
                     f"{errors[-1] * 100:.0f} %; external models {statistics.median(ext) * 100:.0f} % / {ext[-1] * 100:.0f} %")  # fmt: skip
    return "\n".join(lines) + "\n"
