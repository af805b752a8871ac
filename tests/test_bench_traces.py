"""Traces exported by the validation app (OpenTelemetry SDK, OTLP JSON) become the call graph it ran."""

from __future__ import annotations

import sys
import time

from pyproxy.bench.callgraph import graphs_from_traces, read_otlp_lines
from pyproxy.bench.driver import HttpExchanger, wait_ready
from pyproxy.bench.procs import Processes, free_port


def test_a_fanout_traced_by_the_app_imports_as_its_call_graph(tmp_path):
    trace = tmp_path / "spans.jsonl"
    procs = Processes()
    try:
        leaves = {}
        for name in ("b", "c"):
            leaves[name] = f"127.0.0.1:{free_port()}"
            procs.start([sys.executable, "-m", "pyproxy.bench.validation_app", "--listen", leaves[name],
                         "--name", name, "--trace", str(trace), "--work-us", "20000"])  # fmt: skip
        entry = f"127.0.0.1:{free_port()}"
        procs.start([sys.executable, "-m", "pyproxy.bench.validation_app", "--listen", entry, "--name", "a",
                     "--call", leaves["b"], "--call", leaves["c"], "--parallel", "--work-us", "300",
                     "--trace", str(trace)])  # fmt: skip
        for address in (*leaves.values(), entry):
            wait_ready("http", address)
        client = HttpExchanger(entry, 1000)
        client.exchange()  # connections and thread pools set up
        since = time.time_ns()  # only the measured request's trace
        client.exchange()
        client.close()
        assert not trace.exists()  # the services hold their spans while they serve...
    finally:
        procs.stop_all()  # ... and write them as they stop
    spans = read_otlp_lines(trace)
    assert len(graphs_from_traces(spans, "app", {})) > 1  # the probes' and the warm-up's too
    [graph] = graphs_from_traces(spans, "app", {}, since_ns=since)
    root = graph.root
    assert root.callee == "a" and graph.services["a"].mode == "http"
    assert sorted(c.callee for c in root.children) == ["b", "c"]
    assert {c.group for c in root.children} == {0}  # the app called them in parallel
    assert all(c.request == c.response == 1000 for c in [root, *root.children])
    # Each service's own work is what it spun (plus scheduling noise), not its callees' time:
    # the leaves spin 20 ms each, so counting either of them in the root's work (or subtracting
    # both, as if they ran one after the other) lands outside these bounds, while a loaded
    # machine's scheduling delays (several ms on two busy CPUs) stay inside them.
    assert 300_000 <= root.work_ns < 300_000 + 15_000_000
    assert all(20_000_000 <= c.work_ns < 200_000_000 for c in root.children)
