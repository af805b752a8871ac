"""A tiny real `bench validate` run: the HTTP/1.1 and the gRPC app in network-namespace pods,
captured by iptables into pyproxy sidecars, beside the same app without sidecars."""

from __future__ import annotations

import json
import os

import pytest
from pyproxy.bench.callgraph import graphs_from_traces, read_otlp_lines
from pyproxy.bench.validate import Case
from pyproxy.iptables.netns import missing_capabilities

from pyproxy.cli import main

# In CI the pods must be buildable: a missing capability is a failure there, not a skip.
if not os.environ.get("CI"):
    pytestmark = pytest.mark.skipif(
        bool(missing_capabilities()), reason="pods need root, ip, setpriv and iptables"
    )


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile")
    argv = ["bench", "profile", "--modes", "http,grpc", "--ipc", "tcp", "--filters", "fault",
            "--sizes", "100", "--seconds", "0.1", "--idle-rates", "100", "--out", str(profile)]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path_factory.mktemp("validate")
    argv = ["bench", "validate", "--profile", str(profile / "profile.json"),
            "--cases", "http/http+fault,grpc/grpc", "--topologies", "fanout", "--rounds", "1",
            "--seconds", "0.2", "--loads", "0.5", "--traced-requests", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_both_apps_ran_in_captured_pods_with_and_without_sidecars(validated):
    rows = json.loads((validated / "validation.json").read_text())
    assert [(r["app"], r["mode"], r["load"]) for r in rows] == [
        ("http", "http+fault", "closed"),
        ("http", "http+fault", "0.5"),
        ("grpc", "grpc", "closed"),
        ("grpc", "grpc", "0.5"),
    ]
    for r in rows:
        # Every service's sidecar carried the app's connections: the iptables rules steered the
        # inbound calls (a, b, c) and a's outbound calls (to b and c) through it.
        assert all(r["captured"][s]["inbound"] > 0 for s in "abc")
        assert r["captured"]["a"]["outbound"] > 0
        assert r["captured"]["b"]["outbound"] == r["captured"]["c"]["outbound"] == 0
        # Their stage clocks counted the proxies' own work on those requests.
        assert r["stage_clock_us"] > 0 and r["predicted_stage_sum_us"] > 0
        assert r["p50_with_us"] > 0 and r["p50_without_us"] > 0 and r["rate"] > 0
        assert r["predicted_us"] > 0 and r["predicted_external_us"] > 0
    paced = [r for r in rows if r["load"] != "closed"]
    assert all(r["sidecar_cores"] > 0 and r["predicted_cores"] > 0 for r in paced)
    assert (validated / "predicted_vs_measured.png").stat().st_size > 1000
    table = (validated / "table.md").read_text()
    assert "| fanout | grpc | grpc | closed |" in table and "median / worst" in table


def test_the_traces_the_pods_exported_are_the_fanout_in_each_protocol(validated):
    for protocol, mode in (("http", "http+fault"), ("grpc", "grpc")):
        trace = validated / f"traces-fanout-{protocol}-{mode}.jsonl"
        graphs = graphs_from_traces(read_otlp_lines(trace), str(trace), {})
        assert len(graphs) == 5  # the traced requests, and nothing else
        for graph in graphs:
            assert graph.services["a"].mode == protocol
            assert sorted(c.callee for c in graph.root.children) == ["b", "c"]
            assert {c.group for c in graph.root.children} == {0}  # called in parallel
            assert all(c.request == c.response == 100 for c in [graph.root, *graph.root.children])
    rows = json.loads((validated / "validation.json").read_text())
    # Fed those graphs, the prediction prices the same sidecar passes as the hand-built graph.
    for r in rows:
        assert r["traces"] == 5
        assert r["predicted_from_traces_us"] == pytest.approx(r["predicted_us"], rel=0.1)


def test_a_case_names_the_app_protocol_and_the_sidecars():
    assert Case.parse("http/http+fault+ratelimit") == Case("http", "http", ("fault", "ratelimit"))
    assert Case.parse("grpc/tcp").label == "tcp"
    for bad in ("http", "smtp/tcp", "grpc/http", "http/grpc"):
        with pytest.raises(ValueError, match="case"):
            Case.parse(bad)
