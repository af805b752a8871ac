"""A tiny real `bench validate` run: the HTTP/1.1 and the gRPC app in network-namespace pods,
captured by iptables into pyproxy sidecars, beside the same app without sidecars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pyproxy.bench.callgraph import graph_from_data, graphs_from_traces, read_otlp_lines
from pyproxy.bench.model import Profile, current_platform
from pyproxy.bench.procs import halt_poll_ns, move_to_cpu, shield, tree_pids
from pyproxy.bench.validate import (
    Case,
    apps_added_cores,
    halves_differ,
    held_out,
    held_out_table,
    pod_factors,
    timed_on_shared_cpus,
)
from pyproxy.bench.validation_load import summarize
from pyproxy.iptables.netns import NAME_PREFIX, list_namespaces, missing_capabilities

from pyproxy.cli import main

# In CI the pods must be buildable: a missing capability is a failure there, not a skip.
if not os.environ.get("CI"):
    pytestmark = pytest.mark.skipif(
        bool(missing_capabilities()), reason="pods need root, ip, setpriv and iptables"
    )


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A tiny profile in the pods setting: each echo in a captured pod, the driver in a client pod."""
    profile = tmp_path_factory.mktemp("profile")
    argv = ["bench", "profile", "--setting", "pods", "--modes", "http,grpc", "--ipc", "tcp",
            "--filters", "fault", "--sizes", "100", "--seconds", "0.1", "--idle-rates", "100",
            "--out", str(profile)]  # fmt: skip
    assert main(argv) == 0
    return profile


def test_the_pods_profile_measured_a_sidecar_behind_capture_from_a_client_pod(profiled):
    profile = Profile.load(profiled / "profile.json")
    assert profile.setting == "pods"
    assert set(profile.modes) == {"http", "grpc"} and set(profile.filters) == {"fault"}
    for setup in ("http", "grpc", "http+fault"):
        [hot] = [p for p in profile.points if (p["setup"], p["kind"]) == (setup, "latency")]
        # the inbound capture listener's stage clock counted the proxied exchanges
        assert sum(hot["stages_ns"].values()) > 0 and hot["proxy_cpu_ns_per_exchange"] > 0
        # through the sidecar is slower than straight to the plain pod's echo
        assert hot["proxy_p50_ns"] > hot["direct_p50_ns"] > 0
        assert setup in profile.untimed and setup in profile.handoff
        # each path's echo timed on its own: the app behind the sidecar and the plain one
        assert hot["app_cpu_ns"]["mesh"] > 0 and hot["app_cpu_ns"]["plain"] > 0
        assert profile.app_cpu[setup].base == pytest.approx(
            hot["app_cpu_ns"]["mesh"] - hot["app_cpu_ns"]["plain"]
        )
    # every HTTP request was parsed and filtered: the driver's connections were not taken for a
    # server-first protocol and relayed as opaque TCP
    [filtered] = [p for p in profile.points if (p["setup"], p["kind"]) == ("http+fault", "latency")]
    assert filtered["stages_ns"]["filter:fault"] > 0 and filtered["stages_ns"]["parse"] > 0


def test_validate_asks_for_a_profile_or_interleave(tmp_path, capsys):
    assert main(["bench", "validate", "--out", str(tmp_path / "v")]) == 2
    assert "--profile, or --interleave" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_validate_refuses_a_profile_from_another_setting_unless_forced(tmp_path, capsys):
    loopback = tmp_path / "profile.json"
    Profile(current_platform(), {"http": {}}, {}, {}, {}, [], setting="loopback").save(loopback)
    argv = ["bench", "validate", "--profile", str(loopback), "--out", str(tmp_path / "v")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "loopback setting" in err and "pods setting" in err and "--force" in err
    assert not (tmp_path / "v").exists()


@pytest.fixture(scope="module")
def validated(profiled, tmp_path_factory):
    profile = profiled
    out = tmp_path_factory.mktemp("validate")
    argv = ["bench", "validate", "--profile", str(profile / "profile.json"),
            "--cases", "http/http+fault,grpc/grpc", "--topologies", "fanout", "--rounds", "1",
            "--seconds", "0.2", "--loads", "0.5", "--traced-requests", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_both_apps_ran_in_captured_pods_with_and_without_sidecars(validated):
    rows = json.loads((validated / "validation.json").read_text())
    assert [(r["app"], r["mode"], r["load"]) for r in rows] == [
        ("grpc", "grpc", "closed"),
        ("grpc", "grpc", "0.5"),
        ("http", "http+fault", "closed"),
        ("http", "http+fault", "0.5"),
    ]  # in a stable order (topology, app, sidecars), whichever order they were measured in
    for r in rows:
        # Every service's sidecar carried the app's connections: the iptables rules steered the
        # inbound calls (a, b, c) and a's outbound calls (to b and c) through it.
        assert all(r["captured"][s]["inbound"] > 0 for s in "abc")
        assert r["captured"]["a"]["outbound"] > 0
        assert r["captured"]["b"]["outbound"] == r["captured"]["c"]["outbound"] == 0
        # Each listener says how many of its requests a native lane finished in C: the gRPC
        # calls on the gRPC lane (the default, in the profile's sidecars too).
        lanes = [r["captured"][s]["lane"][n] for s in "abc" for n in ("inbound", "outbound")]
        assert all(0 <= native <= express <= requests for requests, express, native in lanes)
        if r["app"] == "grpc":
            assert sum(native for _, _, native in lanes) > 0
        # ... and how many reads its gRPC lane had, and took whole in C (none for HTTP/1)
        reads = [r["captured"][s]["lane_reads"][n] for s in "abc" for n in ("inbound", "outbound")]
        assert all(0 <= whole <= total for total, whole in reads)
        assert (sum(whole for _, whole in reads) > 0) == (r["app"] == "grpc")
        # Their stage clocks counted the proxies' own work on those requests.
        assert r["stage_clock_us"] > 0 and r["predicted_stage_sum_us"] > 0
        assert r["p50_with_us"] > 0 and r["p50_without_us"] > 0 and r["rate"] > 0
        assert r["predicted_us"] > 0 and r["predicted_external_us"] > 0
        # the profile measured a hand-off for its setup; the table also prices without it
        assert r["predicted_without_handoff_us"] > 0 and r["error_without_handoff"] is not None
        # the sidecars' CPU is measured in every phase, the closed loop too
        assert r["sidecar_cores"] > 0 and r["predicted_cores"] > 0
        # and what they add to the apps' own CPU, measured and predicted from the profile (a
        # run this short may measure less than nothing: a noisy difference of two CPU times)
        assert r["apps_added_cores"] is not None and r["predicted_app_cores"] >= 0
        assert r["app_cpu_error"] is not None
    assert (validated / "predicted_vs_measured.png").stat().st_size > 1000
    table = (validated / "table.md").read_text()
    assert "| fanout | grpc | grpc | closed |" in table and "median / worst" in table
    assert "the apps' added CPU: from the profile" in table


def test_the_traces_the_pods_exported_are_the_fanout_in_each_protocol(validated):
    for protocol, mode in (("http", "http+fault"), ("grpc", "grpc")):
        trace = validated / f"traces-fanout-{protocol}-{mode}.jsonl"
        measured = json.loads((validated / f"measured-fanout-{protocol}-{mode}.json").read_text())
        spans = read_otlp_lines(trace)
        # the services wrote every span they held as they stopped: the readiness probes' and
        # the warm-up request's traces too, before the traced requests began
        assert len(graphs_from_traces(spans, str(trace), {})) > 5
        graphs = graphs_from_traces(spans, str(trace), {}, measured["traced_from_ns"])
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


def test_a_traced_graph_on_shared_cpus_keeps_its_shape_and_work_and_takes_the_apps_cpu():
    # a -> (b || c), as spans on one shared CPU time it: each hop's span holds the stacks and
    # the sibling that ran first, which the schedule puts on the CPU itself
    graph = graph_from_data({"calls": [
        {"id": "a", "callee": "a", "rate": 100, "work_us": 150},
        {"id": "b", "parent": "a", "callee": "b", "group": 0, "work_us": 120, "network_us": 400},
        {"id": "c", "parent": "a", "callee": "c", "group": 0, "work_us": 130, "network_us": 650},
    ]})  # fmt: skip
    timed_on_shared_cpus(graph, app_cpu_us=900.0)
    a, b, c = graph.root, *graph.root.children
    assert [x.work_ns for x in (a, b, c)] == [150_000, 120_000, 130_000]
    assert (b.group, c.group) == (0, 0)
    # the rest of the apps' 900 µs a request, over five sides: a, b and c serving, a calling b, c
    stack = (900_000 - 400_000) / 5
    assert [x.app_ns for x in (a, b, c)] == [stack] * 3
    assert [x.client_ns for x in (a, b, c)] == [0.0, stack, stack]  # the load calls a
    assert [x.network_ns for x in (a, b, c)] == [0.0] * 3
    # work beyond the measured CPU leaves no stack CPU, never a negative one
    timed_on_shared_cpus(graph, app_cpu_us=100.0)
    assert [x.app_ns for x in (a, b, c)] == [0.0] * 3


def test_validate_refuses_an_idle_polling_time_it_cannot_set(tmp_path, capsys):
    out = tmp_path / "v"
    argv = ["bench", "validate", "--interleave", "--halt-poll-ns", "-1", "--out", str(out)]
    assert main(argv) == 2
    assert "--halt-poll-ns must be 0 or more" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was measured or written


def test_a_case_names_the_app_protocol_and_the_sidecars():
    assert Case.parse("http/http+fault+ratelimit") == Case("http", "http", ("fault", "ratelimit"))
    assert Case.parse("grpc/tcp").label == "tcp"
    for bad in ("http", "smtp/tcp", "grpc/http", "http/grpc"):
        with pytest.raises(ValueError, match="case"):
            Case.parse(bad)


def test_the_apps_added_cpu_is_the_meshed_apps_less_the_plain_ones_whole_and_by_halves():
    measured = {"cores": {"apps_mesh": 0.30, "apps_plain": 0.25, "sidecars": 0.2},
                "cores_halves": {"apps_mesh": [0.29, 0.31], "apps_plain": [0.25, 0.25]}}  # fmt: skip
    added, halves = apps_added_cores(measured)
    assert added == pytest.approx(0.05) and halves == pytest.approx([0.04, 0.06])
    assert halves_differ(halves) == pytest.approx(0.4)
    assert apps_added_cores({"cores": {"sidecars": 0.2}}) == (None, [])  # not measured


def test_the_halves_of_a_measurement_that_agree_differ_by_nothing():
    # Two halves measuring the same 100 µs differ by 0 %, not 100 %.
    assert halves_differ([100.0, 100.0]) == 0.0
    assert halves_differ([90.0, 110.0]) == pytest.approx(0.2)
    assert halves_differ([-10.0, -30.0]) == pytest.approx(1.0)
    assert halves_differ([5.0]) is None and halves_differ([]) is None
    assert halves_differ([1.0, -1.0]) is None  # a zero mean has no relative spread


def _round(without: float, with_: float, exchanges: int = 100, cpu_ns: float = 5e6) -> dict:
    return {"p50_without_us": without, "p50_with_us": with_, "exchanges": exchanges,
            "wall_s": 1.0, "cpu_ns": {"sidecars": cpu_ns}}  # fmt: skip


def test_a_phase_is_the_median_of_its_rounds_own_differences():
    # The machine drifts by 100 µs between rounds and one round is struck by other load: each
    # round's own difference still says 50 µs, and the struck one moves nothing.
    rounds = [_round(300 + 100 * i, 350 + 100 * i) for i in range(6)]
    rounds[3] = _round(600, 900, cpu_ns=20e6)
    got = summarize(rounds)
    assert got["overhead_us"] == 50.0
    assert got["overhead_halves_us"] == [50.0, 50.0]
    assert got["rate"] == 100.0  # 600 exchanges over 6 s
    # 5 ms of sidecar CPU per 100 exchanges at 100/s: 50 µs each, 0.005 cores
    assert got["cores"]["sidecars"] == pytest.approx(0.005)
    assert got["cores_halves"]["sidecars"] == pytest.approx([0.005, 0.005])
    # one round has no halves
    assert summarize([_round(300, 380)])["overhead_halves_us"] == []
    # the run-queue waits per exchange, the median over the rounds (none recorded: none given)
    assert got["run_delay_us"] == {}
    waited = [_round(300, 350) | {"run_delay_ns": {"sidecars": w}} for w in (1e6, 3e6, 9e6)]
    assert summarize(waited)["run_delay_us"] == {"sidecars": 30.0}
    with pytest.raises(ValueError, match="round"):
        summarize([])


def _row(topology, mode, measured, predicted, cores=None, predicted_cores=0.1):
    return {"topology": topology, "app": "http", "mode": mode, "load": "closed",
            "overhead_us": measured, "predicted_us": predicted, "sidecar_cores": cores,
            "predicted_cores": predicted_cores}  # fmt: skip


def test_pod_factors_come_from_the_fitted_topology_only_and_price_the_held_out_one():
    rows = [
        _row("chain", "http", 150.0, 100.0, cores=0.2),  # the pods cost 1.5x latency, 2x CPU
        _row("chain", "http", 300.0, 200.0, cores=0.2),
        _row("chain", "tcp", 80.0, 100.0),  # no CPU measured: factor 1
        _row("fanout", "http", 999.0, 10.0, cores=9.0),  # held out: moves no factor
        _row("fanout", "http", 240.0, 160.0, cores=0.3, predicted_cores=0.2),
        _row("fanout", "tcp", 40.0, 60.0, cores=0.05, predicted_cores=0.05),
        _row("fanout", "grpc", 1.0, 1.0),  # no fitted setup: not priced
    ]
    assert pod_factors(rows, {"chain"}) == {"http/http": (1.5, 2.0), "http/tcp": (0.8, 1.0)}
    held = held_out(rows, {"chain"})
    assert [r["topology"] for r in held] == ["fanout"] * 3
    assert held[1]["calibrated_us"] == pytest.approx(240.0)
    assert held[1]["calibrated_error"] == pytest.approx(0.0)
    assert held[1]["calibrated_cores"] == pytest.approx(0.4)
    assert held[1]["calibrated_cpu_error"] == pytest.approx(1 / 3)
    assert held[2]["calibrated_error"] == pytest.approx(0.2)  # 48 predicted for 40
    assert "held out" in held_out_table(rows, {"chain"}) and held_out_table(rows, {"x"}) == ""


def test_pinning_puts_every_thread_of_a_process_on_one_cpu():
    import subprocess
    import sys

    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); print(1, flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"1"  # both threads are up
        move_to_cpu([proc.pid], 0)
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 2
        assert all(os.sched_getaffinity(int(tid)) == {0} for tid in tids)
    finally:
        proc.kill()
        proc.wait()


def test_shielding_runs_every_thread_and_what_it_starts_later_sched_fifo():
    import subprocess
    import sys

    code = ("import os, threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); "
            "print(1, flush=True); input(); "
            "print(os.sched_getscheduler(0) == os.SCHED_FIFO, flush=True); time.sleep(30)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == b"1"  # both threads are up
        assert os.sched_getscheduler(proc.pid) == os.SCHED_OTHER
        assert shield([proc.pid])
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) == 2
        assert all(os.sched_getscheduler(int(tid)) == os.SCHED_FIFO for tid in tids)
        assert all(os.sched_getparam(int(tid)).sched_priority == 1 for tid in tids)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"True"  # the process sees it too
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_stopped_by_sigterm_leaves_no_pod_or_process_behind(profiled, tmp_path):
    """`timeout`, a CI job or kill stop a run with SIGTERM: it must tear its pods down as
    Ctrl-C does, not leave namespaces and sidecars running."""
    argv = [sys.executable, "-m", "pyproxy", "bench", "validate",
            "--profile", str(profiled / "profile.json"), "--cases", "http/http",
            "--topologies", "chain", "--rounds", "200", "--seconds", "1", "--loads", "0.5",
            "--out", str(tmp_path / "stopped")]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prefix = f"{NAME_PREFIX}{run.pid}-"
    started: list[int] = []
    try:
        deadline = time.monotonic() + 60
        # Measuring has begun once the pods' apps and sidecars run under it.
        while time.monotonic() < deadline and run.poll() is None:
            started = tree_pids(run.pid)
            if len(started) > 6 and any(n.startswith(prefix) for n in list_namespaces()):
                break
            time.sleep(0.2)
        assert run.poll() is None and len(started) > 6, "the run never got its pods going"
        time.sleep(1.0)
        started = tree_pids(run.pid)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    assert "interrupted" in err, err
    assert [n for n in list_namespaces() if n.startswith(prefix)] == []
    time.sleep(0.5)
    assert [pid for pid in started if pid != run.pid and _alive(pid)] == []


def test_an_interleaved_validation_profiles_each_case_between_its_phases(tmp_path):
    """`--interleave` needs no profile: each case's own, measured in echo pods of its own in
    blocks around the case's phases (the pass and the whole hop, the echoes spinning the app's
    work), prices its rows; the hop a → b is priced whole, the root call per pass."""
    out = tmp_path / "v"
    before = halt_poll_ns()
    polling = [] if before is None else ["--halt-poll-ns", str(before + 12345)]
    argv = ["bench", "validate", "--interleave", "--cases", "http/http+fault+ratelimit",
            "--topologies", "chain", "--rounds", "1", "--seconds", "0.2", "--loads", "0.5",
            "--traced-requests", "3", "--profile-seconds", "0.1", "--profile-idle-rates", "300",
            "--busy-turns", "2", *polling, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    measured = json.loads((out / "measured-chain-http-http+fault+ratelimit.json").read_text())
    # idle vCPUs polled as asked while the case ran (the value read back), and as before after
    assert measured["halt_poll_ns"] == (None if before is None else before + 12345)
    assert halt_poll_ns() == before
    assert measured["profile_blocks"] == 3  # before the closed loop, between, after the paced
    # the meshed pods' counters after each phase (the closed loop, the paced load), each
    # stage's time and how often it ran, and every group's run-queue wait per phase
    by_phase = measured["captured_by_phase"]
    assert len(by_phase) == 2 and set(by_phase[0]) == {"a", "b"}
    inbound = [phase["a"]["stage_events"]["inbound"] for phase in by_phase]
    assert 0 < inbound[0]["parse"] < inbound[1]["parse"]
    for phase in [measured["closed"], *measured["paced"]]:
        assert set(phase["run_delay_us"]) == {"sidecars", "apps_mesh", "apps_plain", "load"}
    profile = Profile.load(out / measured["profile"])
    assert profile.setting == "pods"
    assert set(profile.modes) == {"http+fault+ratelimit", "hop:http+fault+ratelimit"}
    for p in profile.points:  # the busy share is measured once, on loopback
        assert p["blocks"] == (1 if p["kind"] == "busy" else 3)
        assert p.get("echo_work_us", 100.0) == 100.0
    assert 0.0 <= profile.busy_share["http+fault+ratelimit"] <= 1.0
    hot = {p["setup"]: p for p in profile.points if p["kind"] == "latency"}
    # the echoes spun the app's work on both paths; the hop crossed two filtered listeners
    assert hot["http+fault+ratelimit"]["direct_p50_ns"] >= 100_000
    hop = hot["hop:http+fault+ratelimit"]["stages_ns"]
    assert hop["filter:fault"] > 0 and hop["filter:ratelimit"] > 0
    rows = json.loads((out / "validation.json").read_text())
    assert [r["load"] for r in rows] == ["closed", "0.5"]
    for r in rows:
        assert r["hops_whole"] == {"b": "hop:http+fault+ratelimit"}
        assert r["predicted_us"] > 0 and r["predicted_cores"] > 0 and r["traces"] == 3
    assert not [n for n in list_namespaces() if n.startswith(f"{NAME_PREFIX}{os.getpid()}-")]
