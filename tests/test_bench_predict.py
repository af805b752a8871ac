"""Cost-model fitting and call-graph prediction on synthetic data whose answers are worked out by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
from pyproxy.bench.callgraph import (
    CallGraph,
    GraphError,
    Service,
    graph_from_data,
    graphs_from_traces,
    load_graphs,
    with_services,
)
from pyproxy.bench.model import (
    LOOPBACK,
    PODS,
    Handoff,
    IdleCurve,
    Linear,
    PlatformMismatch,
    Profile,
    SettingMismatch,
    StageModel,
    check_platform,
    check_setting,
    current_platform,
    fit_app_cpu,
    fit_busy_share,
    fit_cpu,
    fit_handoff,
    fit_idle_curve,
    fit_latency,
    fit_untimed_cpu,
)
from pyproxy.bench.predict import WhatIf, WhatIfError, distribution, predict
from pyproxy.bench.profile import (
    Setup,
    build_profile,
    fit_idle,
    hop_setup,
    idle_fit,
    pooled,
    setup_for,
)
from pyproxy.bench.schedule import PINNED, HopCost, Placement
from pyproxy.bench.schedule import latency as schedule_latency

from pyproxy.cli import main


def flat(ns: float, per_byte: float = 0.0) -> StageModel:
    """The same figure as latency (ns per exchange) and as CPU (ns per exchange)."""
    return StageModel(Linear(ns, per_byte), Linear(ns, per_byte))


def hand_profile(platform: dict | None = None) -> Profile:
    return Profile(
        platform=platform or current_platform(),
        modes={
            "tcp": {"ipc": flat(1000), "read": flat(500)},
            "http": {"ipc": flat(1000), "parse": flat(2000, 1.0)},
            "grpc": {"ipc": flat(1000), "parse": flat(5000, 1.0)},
        },
        ipc={"unix": flat(400)},
        filters={"fault": flat(3000)},
        external={},
        points=[],
        setting=PODS,
    )


# client → frontend (http) → {a (http, 200 µs) ∥ b (grpc + fault, 195 µs)}; all messages 100 B.
# Sidecar at s = 100: http 1000 + 2100 = 3100 ns; grpc+fault 1000 + 5100 + 3000 = 9100 ns.
# Hops: root 3100 (no client sidecar), a 3100 + 3100 = 6200, b 3100 + 9100 = 12200 ns.
# Before: a is critical (200 > 195). After: a 206.2 µs, b 207.2 µs: b is critical.
# a and b both pass through frontend's sidecar (one event loop, 3100 ns of CPU each at 100 B):
# the parallel group also waits for the other call's pass there, + 3100 ns.
FANOUT = {
    "services": {
        "frontend": {"mode": "http"},
        "a": {"mode": "http"},
        "b": {"mode": "grpc", "filters": ["fault"]},
    },
    "calls": [
        {"id": "root", "callee": "frontend", "rate": 100, "work_us": 100},
        {"id": "a", "parent": "root", "callee": "a", "group": 0, "work_us": 200},
        {"id": "b", "parent": "root", "callee": "b", "group": 0, "work_us": 195},
    ],
}


def test_fit_latency_recovers_known_coefficients_from_noisy_points():
    rng = random.Random(1)
    sizes = [100, 1024, 2048, 4096, 8192, 16384] * 5
    ns = [5000 + 2.5 * s + rng.gauss(0, 50) for s in sizes]
    fit = fit_latency(sizes, ns)
    assert fit.base == pytest.approx(5000, rel=0.01)
    assert fit.per_byte == pytest.approx(2.5, rel=0.01)
    assert 0.99 < fit.r2 <= 1.0


def test_fit_cpu_recovers_known_coefficients_over_rates_and_sizes():
    rng = random.Random(2)
    points = [(r, s) for r in (250, 500, 750, 1000) for s in (100, 1024, 4096, 16384)]
    cpu = [r * (20000 + 0.8 * s) * (1 + rng.gauss(0, 0.002)) for r, s in points]
    fit = fit_cpu([p[0] for p in points], [p[1] for p in points], cpu)
    assert fit.base == pytest.approx(20000, rel=0.02)
    assert fit.per_byte == pytest.approx(0.8, rel=0.02)
    assert fit.r2 > 0.99


def test_a_fit_that_explains_nothing_says_so():
    fit = fit_latency([1, 2, 3, 4, 5, 6], [10, 0, 10, 0, 10, 0])
    assert fit.r2 < 0.2


def test_parallel_fanout_overheads_and_the_critical_path_moving():
    p = predict(hand_profile(), graph_from_data(FANOUT))
    hops = {h.call: h for h in p.hops}
    assert hops["root"].latency_ns == pytest.approx(3100)
    assert hops["a"].latency_ns == pytest.approx(6200)
    assert hops["b"].latency_ns == pytest.approx(12200)
    assert p.path_before == ["root", "a"]
    assert p.path_after == ["root", "b"] and p.path_moved
    assert p.base_ns == pytest.approx(300_000)
    assert p.mesh_ns == pytest.approx(100_000 + 3100 + 195_000 + 12200 + 3100)
    assert p.overhead_ns == pytest.approx(13_400)
    # CPU: every call at 100/s: (3100 + 6200 + 12200) ns × 100 /s = 2.15 ms/s.
    assert p.cpu_cores == pytest.approx(0.00215)
    # On the new path: parse 2100 + 2100 + 5100 = 9300 ns beats ipc 3000 and fault 3000.
    assert p.dominant_latency == "parse"
    assert p.path_stages_ns["filter:fault"] == pytest.approx(3000)


def test_sequential_groups_add_up():
    graph = json.loads(json.dumps(FANOUT))
    graph["calls"][2]["group"] = 1  # b after a
    p = predict(hand_profile(), graph_from_data(graph))
    assert p.base_ns == pytest.approx(495_000)
    assert p.overhead_ns == pytest.approx(3100 + 6200 + 12200)
    assert p.path_after == ["root", "a", "b"]


def test_what_if_a_stage_costs_nothing_moves_the_path_back():
    p = predict(hand_profile(), graph_from_data(FANOUT), WhatIf.parse(["filter:fault=0"]))
    # b's hop loses the 3000 ns fault stage: 195 + 9.2 = 204.2 µs < a's 206.2 µs.
    assert p.path_after == ["root", "a"] and not p.path_moved
    assert p.overhead_ns == pytest.approx(3100 + 6200 + 3100)


def test_what_if_ipc_unix_swaps_the_ipc_stage_everywhere():
    p = predict(hand_profile(), graph_from_data(FANOUT), WhatIf.parse(["ipc=unix"]))
    # Each sidecar's ipc stage: 1000 → 400 ns; root 2500, b 2500 + 8500 = 11000; b also waits
    # for a's 2500 ns pass through frontend's sidecar.
    assert p.overhead_ns == pytest.approx(2500 + 195_000 + 11_000 + 2500 - 200_000)
    assert {h.call: h.latency_ns for h in p.hops}["a"] == pytest.approx(5000)


def test_what_if_and_graph_errors_name_the_problem():
    with pytest.raises(WhatIfError, match="no stage 'wrte'"):
        predict(hand_profile(), graph_from_data(FANOUT), WhatIf.parse(["wrte=0.5"]))
    with pytest.raises(WhatIfError, match="backend not in the profile"):
        predict(hand_profile(), graph_from_data(FANOUT), WhatIf.parse(["ipc=shm"]))
    with pytest.raises(WhatIfError, match="not a number"):
        WhatIf.parse(["write=half"])
    with pytest.raises(GraphError, match=r"calls\[1\].work_us"):
        graph_from_data(
            {"calls": [{"id": "r", "callee": "x"}, {"parent": "r", "callee": "y", "work_us": -1}]}
        )
    with pytest.raises(GraphError, match="exactly one root"):
        graph_from_data({"calls": [{"callee": "x"}, {"callee": "y"}]})
    with pytest.raises(GraphError, match="mode"):
        graph_from_data({"services": {"x": {"mode": "smtp"}}, "calls": [{"callee": "x"}]})


def test_a_profile_from_another_platform_is_refused_unless_forced():
    other = dict(current_platform(), cpu_model="Some Other CPU", kernel="1.0")
    with pytest.raises(PlatformMismatch, match="cpu_model"):
        check_platform(hand_profile(other), current_platform(), force=False)
    differences = check_platform(hand_profile(other), current_platform(), force=True)
    assert len(differences) == 2


def test_a_profile_from_another_setting_is_refused_naming_both_unless_forced(tmp_path, capsys):
    loopback = dataclasses.replace(hand_profile(), setting=LOOPBACK)
    with pytest.raises(SettingMismatch, match="loopback setting.*pods setting"):
        check_setting(loopback, PODS, force=False)
    assert check_setting(loopback, PODS, force=True) == "setting: profile 'loopback', here 'pods'"
    assert check_setting(hand_profile(), PODS, force=False) is None
    # a profile that does not say where it was taken was taken on loopback
    stored = hand_profile().to_json()
    del stored["setting"]
    assert Profile.from_json(stored).setting == LOOPBACK
    path, graph = tmp_path / "profile.json", tmp_path / "g.json"
    loopback.save(path)
    graph.write_text(json.dumps(FANOUT))
    assert main(["bench", "predict", str(graph), "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "loopback" in err and "pods" in err and "--force" in err
    assert (
        main(["bench", "predict", str(graph), "--profile", str(path), "--setting", "loopback"]) == 0
    )
    assert main(["bench", "predict", str(graph), "--profile", str(path), "--force"]) == 0
    assert "forced across platforms or settings: setting" in capsys.readouterr().err


def test_batch_distribution_counts_moved_paths():
    graphs = []
    for work_b in (150, 195, 199):  # only 195 and 199 µs let b overtake a after the sidecars
        graph = json.loads(json.dumps(FANOUT))
        graph["calls"][2]["work_us"] = work_b
        graphs.append(graph_from_data(graph))
    d = distribution([predict(hand_profile(), g) for g in graphs])
    assert d["graphs"] == 3 and d["critical_path_moved"] == 2
    # Overheads 12.4 (a stays critical), 13.4 and 17.4 µs (b overtakes a).
    assert d["latency_overhead_us"]["p50"] == pytest.approx(13.4)


def _otlp(spans: list[tuple[str, str, str | None, int, int, int, dict]]) -> dict:
    """An OTLP JSON export: (service, span id, parent id, kind, start µs, end µs, attributes)."""
    resources: dict[str, list] = {}
    for service, span_id, parent, kind, start, end, attrs in spans:
        resources.setdefault(service, []).append({
            "traceId": "t1", "spanId": span_id, "parentSpanId": parent or "", "name": span_id,
            "kind": kind, "startTimeUnixNano": str(start * 1000), "endTimeUnixNano": str(end * 1000),
            "attributes": [{"key": k, "value": {"stringValue": str(v)}} for k, v in attrs.items()],
        })  # fmt: skip
    return {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": s}}]},
         "scopeSpans": [{"spans": spans_}]}
        for s, spans_ in resources.items()
    ]}  # fmt: skip


def test_otlp_trace_becomes_the_same_graph_as_the_hand_written_one():
    http, grpc = {"http.request.method": "GET"}, {"rpc.system": "grpc"}
    doc = _otlp([
        ("frontend", "s1", None, 2, 0, 300, http),
        ("frontend", "c_a", "s1", 3, 50, 250, http),   # client spans, in parallel
        ("a", "s_a", "c_a", 2, 50, 250, http),
        ("frontend", "c_b", "s1", 3, 60, 255, grpc),
        ("b", "s_b", "c_b", 2, 60, 255, grpc),
    ])  # fmt: skip
    [plain] = graphs_from_traces(doc, "otlp", {})
    assert plain.services["b"].mode == "grpc" and plain.services["a"].mode == "http"
    # What a trace cannot say (b's sidecar runs the fault filter) comes from the overlay.
    [graph] = graphs_from_traces(doc, "otlp", {"b": Service("b", "grpc", ("fault",))})
    root = graph.root
    # Its own work is its self time: 300 µs less the 205 its parallel calls were in flight
    # (50-255 µs), not less the slowest one's 200: the 10 µs between the two calls' starts are
    # its RPC stack sending the second (and, on a CPU it shares, its neighbours' work).
    assert root.callee == "frontend" and root.work_ns == pytest.approx(95_000)
    assert sorted(c.callee for c in root.children) == ["a", "b"]
    assert {c.group for c in root.children} == {0}
    p = predict(hand_profile(), graph)
    assert p.base_ns == pytest.approx(295_000)  # a's 200 µs after the 95
    assert p.path_before == ["s1", "s_a"]
    assert p.path_after == ["s1", "s_b"]


def test_jaeger_trace_with_sequential_children():
    doc = {"data": [{
        "traceID": "j1",
        "processes": {"p1": {"serviceName": "frontend"}, "p2": {"serviceName": "a"}},
        "spans": [
            {"spanID": "r", "references": [], "startTime": 1000, "duration": 500, "processID": "p1",
             "tags": [{"key": "span.kind", "value": "server"}, {"key": "http.method", "value": "GET"}]},
            {"spanID": "x", "references": [{"refType": "CHILD_OF", "spanID": "r"}], "startTime": 1100,
             "duration": 100, "processID": "p2", "tags": [{"key": "span.kind", "value": "server"}]},
            {"spanID": "y", "references": [{"refType": "CHILD_OF", "spanID": "r"}], "startTime": 1250,
             "duration": 150, "processID": "p2", "tags": [{"key": "span.kind", "value": "server"}]},
        ],
    }]}  # fmt: skip
    [graph] = graphs_from_traces(doc, "jaeger", {})
    assert [c.group for c in graph.root.children] == [0, 1]
    assert graph.root.work_ns == pytest.approx(250_000)
    assert predict(hand_profile(), graph).base_ns == pytest.approx(500_000)


def test_predict_command_markdown_json_and_batch_cdf(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    hand_profile().save(profile)
    graph = tmp_path / "fanout.yaml"
    graph.write_text(json.dumps(FANOUT))  # JSON is YAML
    assert (
        main(["bench", "predict", str(graph), "--profile", str(profile), "--what-if", "ipc=unix"])
        == 0
    )
    out = capsys.readouterr().out
    assert "overhead **13.4 µs**" in out and "(moved)" in out and "ipc=unix" in out
    second = tmp_path / "second.json"
    second.write_text(json.dumps(FANOUT))
    code = main(["bench", "predict", str(graph), str(second), "--profile", str(profile),
                 "--json", "--what-if", "ipc=unix", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"]["as measured"]["distribution"]["graphs"] == 2
    assert (tmp_path / "out" / "overhead_cdf.png").stat().st_size > 1000
    assert (tmp_path / "out" / "what_if.png").stat().st_size > 1000
    assert main(["bench", "report", str(tmp_path / "out"), "--format", "markdown"]) == 0
    assert "| as measured | 2 | 13.4 |" in (tmp_path / "out" / "report.md").read_text()


def test_predict_command_refuses_a_foreign_profile(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    hand_profile(dict(current_platform(), kernel="0.0-other")).save(profile)
    graph = tmp_path / "g.yaml"
    graph.write_text(json.dumps(FANOUT))
    assert main(["bench", "predict", str(graph), "--profile", str(profile)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["bench", "predict", str(graph), "--profile", str(profile), "--force"]) == 0


def test_services_overlay_sets_what_traces_cannot_say(tmp_path):
    services = tmp_path / "services.yaml"
    services.write_text("b: {mode: grpc, filters: [fault], ipc: unix}\n")
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(FANOUT))
    [g] = load_graphs([graph], services)
    assert g.services["b"].ipc == "unix"


def test_idle_curve_interpolates_in_log_rate_and_is_nothing_at_the_closed_loop():
    curve = IdleCurve(((100, 8000, 4000), (1000, 2000, 1000), (10_000, 0, 0)))
    assert curve.at(10_000) == curve.at(20_000) == (0.0, 0.0)
    assert curve.at(50) == curve.at(100) == (8000, 4000)  # held flat below the lowest rate
    lat, cpu = curve.at(math.sqrt(100 * 1000))  # half way between 100 and 1000 /s in log(rate)
    assert lat == pytest.approx(5000) and cpu == pytest.approx(2500)
    assert curve.at(3162.28)[0] == pytest.approx(1000, rel=1e-3)
    assert IdleCurve.from_json(curve.to_json()) == curve


def test_fit_idle_curve_pools_a_point_that_says_slower_is_cheaper_and_clamps_at_zero():
    paced = [
        (100, 9000.0, 900.0),
        (300, 5000.0, -50.0),
        (1000, 7000.0, 300.0),
        (3000, 1000.0, 100.0),
    ]
    curve = fit_idle_curve(8000.0, [*paced, (9000, 5.0, 5.0)])  # above the closed loop: ignored
    assert [p[0] for p in curve.points] == [100, 300, 1000, 3000, 8000.0]
    # 5000 then 7000 at a higher rate cannot both be right: both become their mean.
    assert [p[1] for p in curve.points] == [9000, 6000, 6000, 1000, 0]
    # -50 is held at 0, which then sits below 300 at a higher rate: pooled to 150.
    assert [p[2] for p in curve.points] == [900, 150, 150, 100, 0]
    assert fit_idle_curve(8000.0, []).at(10) == (0.0, 0.0)


def test_idle_curve_read_by_the_idle_gap_interpolates_in_log_gap():
    # 1 ms before the 100 /s point's exchange, 100 µs before the closed loop's.
    curve = IdleCurve(((100, 8000, 4000), (1000, 2000, 1000), (5000, 0, 0)),
                      (9_800_000, 800_000, 100_000))  # fmt: skip
    assert curve.after_gap(20_000_000) == curve.after_gap(9_800_000) == (8000, 4000)
    assert curve.after_gap(100_000) == curve.after_gap(50_000) == (0, 0)
    lat, cpu = curve.after_gap(math.sqrt(800_000 * 100_000))  # half way in log(gap)
    assert lat == pytest.approx(1000) and cpu == pytest.approx(500)
    assert IdleCurve.from_json(curve.to_json()) == curve
    # a curve stored without gaps (an older profile) reads a gap as the rate 1 / gap
    old = IdleCurve(curve.points)
    assert IdleCurve.from_json(old.to_json()) == old
    assert old.after_gap(10_000_000) == old.at(100)


def test_after_gaps_prices_the_cpus_idling_whole_and_the_busy_share_of_the_rest_of_the_wait():
    # 8 µs (4 µs CPU) after 10 ms, 2 µs (1 µs CPU) after 1 ms, nothing after 100 µs
    curve = IdleCurve(((100, 8000, 4000), (1000, 2000, 1000), (10_000, 0, 0)),
                      (10_000_000, 1_000_000, 100_000))  # fmt: skip
    # the sidecar waited 10 ms, its CPU idled 1 ms of it and ran other sidecars the rest
    assert curve.after_gaps(10_000_000, 1_000_000, 0.0) == (2000, 1000)  # the CPU's only
    assert curve.after_gaps(10_000_000, 1_000_000, 1.0) == (8000, 4000)  # the sidecar's wait
    assert curve.after_gaps(10_000_000, 1_000_000, 0.5) == (5000, 2500)
    assert curve.after_gaps(10_000_000, 0.0, 0.5, scale=0.5) == (2000, 1000)
    # a CPU that idled the whole wait: the curve, whatever the share
    assert curve.after_gaps(10_000_000, 10_000_000, 0.0) == curve.after_gaps(
        10_000_000, 10_000_000, 1.0
    )


def test_fit_busy_share_is_what_taking_turns_adds_over_what_pacing_adds_held_in_0_to_1():
    def point(turns: int, one: list[float], taking: list[float], paced: list[float]) -> dict:
        return {"setup": "grpc", "kind": "busy", "size": 100, "turns": turns,
                "one_cpu_ns": one, "turns_cpu_ns": taking, "paced_cpu_ns": paced}  # fmt: skip

    # per round beyond one called back to back: taking turns +30, +10, +20 (median 20 µs),
    # paced +40, +50, +60 (median 50 µs): 0.4; the point with the most sidecars counts
    rounds = point(8, [100e3, 110e3, 90e3], [130e3, 120e3, 110e3], [140e3, 160e3, 150e3])
    assert fit_busy_share([point(2, [1.0], [1.0], [9.0]), rounds]) == pytest.approx(0.4)
    assert fit_busy_share([point(8, [100e3], [300e3], [150e3])]) == 1.0  # held at 1
    assert fit_busy_share([point(8, [100e3], [90e3], [150e3])]) == 0.0  # and at 0
    assert fit_busy_share([point(8, [100e3], [150e3], [95e3])]) == 0.0  # pacing added nothing
    assert fit_busy_share([]) is None
    stored = dataclasses.replace(hand_profile(), busy_share={"grpc": 0.4}).to_json()
    assert Profile.from_json(json.loads(json.dumps(stored))).busy_share == {"grpc": 0.4}


def test_fit_idle_curve_gives_each_point_the_idle_gap_before_its_exchange():
    # the proxied exchange took 200 µs closed loop (4000 /s), 260 µs at 100 /s, 240 µs at 1000 /s
    spans = {100: 260_000.0, 1000: 240_000.0, 4000.0: 200_000.0}
    curve = fit_idle_curve(4000.0, [(100, 60_000.0, 9000.0), (1000, 40_000.0, 2000.0)], spans)
    assert curve.gaps_ns == pytest.approx((9_740_000, 760_000, 50_000))
    # a span longer than its period (a disturbed point) still leaves the gaps falling with rate
    tight = fit_idle_curve(4000.0, [(1000, 40_000.0, 2000.0)], {1000: 990_000.0, 4000.0: 0.0})
    assert tight.gaps_ns[0] > tight.gaps_ns[1]


def test_fit_idle_curve_keeps_the_stages_part_within_the_latency():
    spans = {100: 200_000.0, 1000: 200_000.0, 4000.0: 200_000.0}
    curve = fit_idle_curve(4000.0, [(100, 60_000.0, 9000.0, 70_000.0),
                                    (1000, 30_000.0, 2000.0, 10_000.0)], spans)  # fmt: skip
    assert curve.stage_ns == (60_000, 10_000, 0)  # 70 µs of stages in 60 µs: all of it
    # points without the stage clock (older profiles) give no stages' part
    assert fit_idle_curve(4000.0, [(100, 60_000.0, 9000.0)], spans).stage_ns == ()


def test_the_profiles_paced_points_give_the_curve_its_gaps_stages_part_and_fit():
    hot = {"setup": "http", "kind": "latency", "size": 100, "rate": 4000.0,
           "direct_p50_ns": 100_000.0, "proxy_p50_ns": 200_000.0,
           "proxy_cpu_ns_per_exchange": 50_000.0, "stages_ns": {"read": 30_000.0}}  # fmt: skip

    def paced(rate: float, extra: float, stages: float, cpu: float) -> dict:
        return {"setup": "http", "kind": "idle", "size": 100, "rate": rate, "paced_rate": rate,
                "direct_p50_ns": 100_000.0, "proxy_p50_ns": 200_000.0 + extra,
                "proxy_cpu_ns_per_exchange": 50_000.0 + cpu,
                "stages_ns": {"read": 30_000.0 + stages}}  # fmt: skip

    points = [hot, paced(100, 60_000, 20_000, 9000), paced(1000, 10_000, 5000, 1000)]
    curve = fit_idle(points)
    assert curve is not None
    assert curve.points == ((100, 60_000, 9000), (1000, 10_000, 1000), (4000.0, 0, 0))
    # each point's gap: its period less its proxied exchange's p50
    assert curve.gaps_ns == pytest.approx((10_000_000 - 260_000, 1_000_000 - 210_000, 50_000))
    assert curve.stage_ns == (20_000, 5000, 0)
    assert idle_fit(points, "http", curve) == (pytest.approx(1.0), pytest.approx(1.0))
    # a slower point that says it cost less is pooled with its neighbour: the fit says so
    disturbed = [hot, paced(100, 10_000, 0, 1000), paced(300, 60_000, 0, 1000)]
    r2_latency, r2_cpu = idle_fit(disturbed, "http", fit_idle(disturbed))
    assert r2_latency < 0.5 and r2_cpu == pytest.approx(1.0)


def test_on_shared_cpus_a_pass_after_an_idle_gap_costs_what_the_profile_measured_there():
    """The profile's own paced point, priced back: one http pass in front of an echo working
    100 µs, one exchange every 10 ms, the proxy's CPU idle the rest of the time. Pinned, the
    schedule must charge the whole wake-up the curve measured after that gap (40 µs), as the
    per-pass pricing at the call's rate does, not a part of it."""
    base = hand_profile()
    span = 3100 + 100_000  # the pass's stages around the echo's work, as the schedule lays it
    curve = fit_idle_curve(4000.0, [(100, 40_000.0, 8000.0)],
                           {100: span, 4000.0: span})  # fmt: skip
    profile = dataclasses.replace(base, idle={"http": curve})
    for rate, wake in ((100, 40_000), (4000, 0)):
        one = graph_from_data({"calls": [{"id": "e", "callee": "e", "rate": rate,
                                          "work_us": 100}],
                               "services": {"e": {"mode": "http"}}})  # fmt: skip
        placed = predict(profile, one, placement=PINNED)
        assert placed.overhead_ns == pytest.approx(predict(profile, one).overhead_ns, rel=1e-3)
        assert placed.path_stages_ns["idle"] == pytest.approx(wake, abs=1)
        assert placed.cpu_stages["idle"] == pytest.approx(rate * (8000 if wake else 0) / 1e9)


def _f_calls_a(x_work_us: float = 50, f_filters: tuple[str, ...] = ()) -> CallGraph:
    """client → f (100 µs of work, 100 /s) → a, every sidecar in http mode."""
    return graph_from_data({
        "services": {"f": {"mode": "http", "filters": list(f_filters)}, "a": {"mode": "http"}},
        "calls": [{"id": "r", "callee": "f", "rate": 100, "work_us": 100},
                  {"id": "x", "parent": "r", "callee": "a", "work_us": x_work_us}],
    })  # fmt: skip


def test_predict_adds_each_sidecars_wake_up_cost_at_the_calls_rate():
    base = hand_profile()
    # http sidecars at 100 /s: 4000 ns latency and 2000 ns CPU per exchange beyond the closed loop.
    profile = Profile(base.platform, base.modes, base.ipc, base.filters, {}, [],
                      {"http": IdleCurve(((100, 4000, 2000), (5000, 0, 0)))})  # fmt: skip
    graph = _f_calls_a()
    p = predict(profile, graph)
    hops = {h.call: h for h in p.hops}
    # 4000 ns per sidecar pass; r crosses f's inbound, x f's outbound and a's inbound.
    assert hops["r"].stages_ns["idle"] == pytest.approx(4000)
    assert hops["x"].stages_ns["idle"] == pytest.approx(8000)
    assert p.overhead_ns == pytest.approx(3 * (3100 + 4000))
    # CPU: 3 passes × (3100 + 2000) ns × 100 /s.
    assert p.cpu_cores == pytest.approx(3 * 5100 * 100 / 1e9)
    halved = predict(profile, graph, WhatIf.parse(["idle=0.5"]))
    assert halved.overhead_ns == pytest.approx(3 * (3100 + 2000))
    with pytest.raises(WhatIfError, match="no stage 'idle'"):
        predict(hand_profile(), graph, WhatIf.parse(["idle=0.5"]))


def _latency_point(setup: str, size: int, direct: float, proxied: float, stages: dict) -> dict:
    return {"setup": setup, "kind": "latency", "size": size, "exchanges": 100,
            "direct_p50_ns": direct, "proxy_p50_ns": proxied, "rate": 1000.0,
            "proxy_cpu_ns_per_exchange": 0.0, "stages_ns": stages}  # fmt: skip


def test_profile_stores_the_hand_off_the_stage_clock_does_not_see():
    # Known answer: added p50 = stage-clock sum + 50 µs + 2 ns/B; one size 1 µs off the line.
    points = []
    for size, off in ((100, 0.0), (1024, 1000.0), (4096, 0.0), (8192, 0.0)):
        stages = {"read": 3000.0 + size, "write": 4000.0 + 0.5 * size}
        gap = 50_000.0 + 2.0 * size + off
        points.append(
            _latency_point("http", size, 20_000.0, 20_000.0 + sum(stages.values()) + gap, stages)
        )
    profile = build_profile([Setup("http", "http")], points, current_platform())
    handoff = profile.handoff["http"]
    # least squares through the four gaps: the 1 µs outlier moves the line a little
    assert handoff.latency.base == pytest.approx(50_000, abs=500)
    assert handoff.latency.per_byte == pytest.approx(2.0, abs=0.1)
    assert 0.99 < handoff.latency.r2 < 1.0 and 500 < handoff.spread_ns < 1000
    exact = fit_handoff([100, 1000], [50_200, 52_000])
    assert (exact.latency.base, exact.latency.per_byte, exact.spread_ns) == pytest.approx(
        (50_000, 2.0, 0.0)
    )
    again = Profile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again.handoff == profile.handoff
    # The external models already include it: their view has no hand-off of its own.
    assert profile.external_view().handoff == {}


def test_predict_adds_the_hand_off_once_per_hop_through_sidecars_on_latency_only():
    base = hand_profile()
    profile = Profile(base.platform, base.modes, base.ipc, base.filters, {}, [], {},
                      {"http": Handoff(Linear(57_000, 10.0))})  # fmt: skip
    graph = graph_from_data({
        "services": {"f": {"mode": "http", "filters": ["fault"]}, "a": {"mode": "http"}},
        "calls": [{"id": "r", "callee": "f", "rate": 100, "work_us": 100,
                   "request": 100, "response": 100},
                  {"id": "x", "parent": "r", "callee": "a", "work_us": 50,
                   "request": 300, "response": 100}],
    })  # fmt: skip
    without = predict(base, graph)
    p = predict(profile, graph)
    hops = {h.call: h for h in p.hops}
    # r crosses f's inbound (100 B), x f's outbound and a's inbound (200 B): once per hop, as
    # app → sidecars → app; a filtered sidecar pays its mode's hand-off.
    assert hops["r"].stages_ns["handoff"] == pytest.approx(57_000 + 10 * 100)
    assert hops["x"].stages_ns["handoff"] == pytest.approx(57_000 + 10 * 200)
    assert p.overhead_ns - without.overhead_ns == pytest.approx(58_000 + 59_000)
    assert p.cpu_cores == pytest.approx(without.cpu_cores) and "handoff" not in p.cpu_stages
    assert p.dominant_latency == "handoff"
    off = predict(profile, graph, WhatIf.parse(["handoff=0"]))
    assert off.overhead_ns == pytest.approx(without.overhead_ns)
    with pytest.raises(WhatIfError, match="no stage 'handoff'"):
        predict(base, graph, WhatIf.parse(["handoff=0.5"]))


def _fanout_graph(work_us: float = 100) -> CallGraph:
    return graph_from_data({
        "services": {s: {"mode": "http"} for s in "abc"},
        "calls": [{"id": "a", "callee": "a", "rate": 100, "work_us": work_us},
                  {"id": "b", "parent": "a", "callee": "b", "group": 0, "work_us": work_us},
                  {"id": "c", "parent": "a", "callee": "c", "group": 0, "work_us": work_us}],
    })  # fmt: skip


def _passes(ns: float):
    """Every sidecar pass costs `ns` per exchange (half each way); the root has no outbound one."""
    return lambda call: HopCost(0.0 if call.parent is None else ns, ns, 0.0)


def test_schedule_without_shared_cpus_is_the_critical_path_with_a_shared_sidecar():
    graph = _fanout_graph()
    # Known answer (µs): a's inbound 5, a works to 105; b's and c's request halves queue on a's
    # sidecar (105-110, 110-115), c's inbound 115-120; b works 115-215, c 120-220; b's response
    # halves 215-225, c's inbound 220-225, then a's sidecar 225-230 after b's; a's 230-235.
    assert schedule_latency(graph, Placement(), lambda call: HopCost())[0] == pytest.approx(200_000)
    assert schedule_latency(graph, Placement(), _passes(10_000))[0] == pytest.approx(235_000)
    # A chain has nothing to share: the critical path plus every pass and delay.
    chain = graph_from_data({"calls": [{"id": "a", "callee": "a", "work_us": 100},
                                       {"id": "b", "parent": "a", "callee": "b", "work_us": 100}]})  # fmt: skip
    cost = lambda call: HopCost(0.0 if call.parent is None else 10_000, 10_000, 7_000)  # noqa: E731
    assert schedule_latency(chain, PINNED, cost)[0] == pytest.approx(200_000 + 30_000 + 14_000)


def test_pinned_apps_take_turns_and_sidecars_overlap_the_other_calls_work():
    graph = _fanout_graph()
    # Plain, the apps share CPU 0: b and c work one after the other, 300 µs.
    assert schedule_latency(graph, PINNED, lambda call: HopCost())[0] == pytest.approx(300_000)
    # Meshed (µs): a's inbound 0-5 (CPU 1), a works 5-105 (CPU 0); on CPU 1 a's sidecar
    # passes b's request and goes on with c's (105-115), then b's inbound 115-120, c's 120-125;
    # b works 120-220, c 220-320 (CPU 0 was busy); b's response halves 220-230, c's 320-330,
    # a's inbound 330-335. c's passes ran beside b's work: the fan-out costs 35 µs, one
    # branch's passes, the root's and the wait for a's sidecar, not 40.
    assert schedule_latency(graph, PINNED, _passes(10_000))[0] == pytest.approx(335_000)
    # Passes longer than the work leave CPU 1 the bottleneck: (µs) a's inbound 0-50, a works
    # 50-150; CPU 1: a's sidecar passes both requests 150-250, b's inbound 250-300, c's
    # 300-350; b works 300-400, c 400-500; b's response halves 400-500, c's 500-600, a's
    # inbound 600-650.
    assert schedule_latency(graph, PINNED, _passes(100_000))[0] == pytest.approx(650_000)


def test_predict_on_shared_cpus_prices_plain_and_meshed_with_the_schedule():
    base = hand_profile()
    graph = _fanout_graph()
    placed = predict(base, graph, placement=PINNED)
    # http sidecar pass 3100 ns: a's inbound 1550, a works; on CPU 1 a's sidecar passes both
    # requests (1550 each), b's inbound 1550; b works 106.2-206.2 µs, c after it to 306.2;
    # c's response halves, a's half.
    assert placed.base_ns == pytest.approx(300_000)
    assert placed.mesh_ns == pytest.approx(1550 + 100_000 + 3100 + 1550 + 200_000 + 3100 + 1550)
    assert placed.overhead_ns == pytest.approx(10_850)
    # CPU does not depend on where the processes run.
    assert placed.cpu_cores == pytest.approx(predict(base, graph).cpu_cores)


def test_on_shared_cpus_a_pass_pays_for_its_own_wait_and_its_cpus_idling():
    chain = graph_from_data({"calls": [{"id": "a", "callee": "a", "work_us": 100},
                                       {"id": "b", "parent": "a", "callee": "b", "work_us": 100}]})  # fmt: skip
    seen: list[tuple[float, float]] = []

    def wake(gap_ns: float, cpu_gap_ns: float) -> tuple[float, float]:
        """20 µs (5 µs CPU) after the CPU idled 1 ms or more; 10 µs (2 µs) after the sidecar
        alone waited that long, its CPU busy."""
        seen.append((gap_ns, cpu_gap_ns))
        if cpu_gap_ns >= 1_000_000:
            return 20_000.0, 5_000.0
        return (10_000.0, 2_000.0) if gap_ns >= 1_000_000 else (0.0, 0.0)

    def cost(call):
        return HopCost(0.0 if call.parent is None else 10_000, 10_000, 0.0, wake, wake)

    # Without a period every process starts busy: passes 30 µs on 200 µs of work.
    assert schedule_latency(chain, PINNED, cost) == (pytest.approx(230_000), 0.0)
    # One request every 10 ms: a's sidecar last ran in the previous request, and CPU 1 idled
    # since: its inbound request half pays 20 µs. b's sidecar waited as long, but CPU 1 ran
    # a's outbound pass just before its inbound one: 10 µs. a's outbound pass follows a's
    # inbound one by 100 µs of app work, and every response half follows its request half by
    # the work below it: they pay nothing. Priced per pass at the call's rate, the same curve
    # would add 60 µs.
    seen.clear()
    total, wake_cpu = schedule_latency(chain, PINNED, cost, period_ns=10_000_000)
    assert total == pytest.approx(260_000) and wake_cpu == pytest.approx(7_000)
    assert all(0 <= cpu_gap <= gap for gap, cpu_gap in seen)


def test_predict_on_shared_cpus_puts_the_schedules_wake_ups_in_the_idle_stage():
    base = hand_profile()
    # http sidecars: 40 µs (8 µs CPU) per exchange beyond the closed loop below 1000 /s.
    profile = Profile(base.platform, base.modes, base.ipc, base.filters, {}, [],
                      {"http": IdleCurve(((100, 40_000, 8_000), (999, 40_000, 8_000),
                                          (1000, 0, 0)))})  # fmt: skip
    chain = _f_calls_a(x_work_us=100)
    per_pass = predict(profile, chain)
    placed = predict(profile, chain, placement=PINNED)
    assert per_pass.path_stages_ns["idle"] == pytest.approx(3 * 40_000)
    # Pinned, only f's inbound pass follows CPU 1's idle gap between requests: all of its
    # 40 µs on its request half; its response half follows a's inbound one directly, which
    # followed a's work: a curve without gaps reads 100 µs as 10 kHz, no idle gap at all.
    # a's inbound pass follows f's outbound one on a busy CPU: without a busy share it pays
    # nothing for its sidecar's own wait.
    assert placed.path_stages_ns["idle"] == pytest.approx(40_000)
    assert placed.overhead_ns == pytest.approx(3 * 3100 + 40_000)
    assert placed.cpu_stages["idle"] == pytest.approx(100 * 8_000 / 1e9)
    # With all of the curve paid after a wait on a busy CPU (a busy share of 1), a's too.
    busy = predict(dataclasses.replace(profile, busy_share={"http": 1.0}), chain,
                   placement=PINNED)  # fmt: skip
    assert busy.path_stages_ns["idle"] == pytest.approx(2 * 40_000)
    assert busy.cpu_stages["idle"] == pytest.approx(100 * 2 * 8_000 / 1e9)


def test_an_apps_own_cpu_is_half_taking_the_call_half_answering_it():
    graph = _fanout_graph()
    for call in graph.calls():
        call.app_ns = 40_000.0
    # Plain, all on CPU 0 (µs): a takes the call and works 0-120, b 120-240, b answers
    # 240-260, c 260-380 and answers 380-400, a answers 400-420: every app's CPU in turn.
    assert schedule_latency(graph, PINNED, lambda call: HopCost())[0] == pytest.approx(420_000)
    # Meshed: a's inbound half 0-5, a 5-125, a's sidecar passes both requests 125-135, b's
    # inbound 135-140, c's 140-145; b 140-260 and answers 260-280 (it goes on: it never
    # waited) while c waits for CPU 0 (280-400, answers 400-420); c's response halves
    # 420-430, a answers 430-450, its inbound half 450-455.
    assert schedule_latency(graph, PINNED, _passes(10_000))[0] == pytest.approx(455_000)
    # Without shared CPUs the same time is on each call's path, plain and meshed alike.
    unplaced = predict(hand_profile(), graph)
    assert unplaced.base_ns == pytest.approx(100_000 + 40_000 + 140_000)


def test_a_filter_costs_all_its_path_costs_beyond_the_unfiltered_one():
    # Known answer: with fault, the write stage also grows by 500 ns (another path through the
    # proxy) beside the filter's own 2000 ns; the hand-off grows from 40 to 46 µs.
    points = []
    for size in (100, 1000):
        plain = {"read": 3000.0, "write": 4000.0}
        filtered = {"read": 3000.0, "write": 4500.0, "filter:fault": 2000.0}
        points.append(_latency_point("http", size, 20_000.0, 20_000.0 + 7000 + 40_000, plain))
        points.append(
            _latency_point("http+fault", size, 20_000.0, 20_000.0 + 9500 + 46_000, filtered)
        )
    profile = build_profile(
        [Setup("http", "http"), Setup("http+fault", "http", filters=("fault",))],
        points,
        current_platform(),
    )
    assert profile.filters["fault"].latency.at(100) == pytest.approx(2500)
    hops = {h.call: h for h in predict(profile, _f_calls_a(f_filters=("fault",))).hops}
    # r: f's inbound pass (7000 + 2500) and f's hand-off, 40 + 6 µs; x: f's outbound and a's
    # inbound (7000 each, plus 2500 for f's filter) and the larger of their hand-offs.
    assert hops["r"].latency_ns == pytest.approx(9500 + 46_000)
    assert hops["x"].latency_ns == pytest.approx(9500 + 7000 + 46_000)


def _cpu_point(setup: str, size: int, rate: float, stages: dict, process_ns: float) -> dict:
    """A paced point: `stages` and `process_ns` are ns per exchange, stored per wall second."""
    return {"setup": setup, "kind": "cpu", "size": size, "load": 1.0, "rate": rate,
            "proxy_cpu_ns_per_s": rate * process_ns,
            "stages_ns_per_s": {k: rate * v for k, v in stages.items()}}  # fmt: skip


def test_profile_fits_the_cpu_its_stage_clock_does_not_see_per_setup():
    # Known answer: per exchange, /proc CPU = stage sum + 15 µs + 2 ns/B without a filter,
    # + 18 µs + 2 ns/B with fault; the stages themselves grow with size and differ by setup.
    points = []
    for rate in (250.0, 500.0, 1000.0):
        for size in (100, 1024, 4096):
            plain = {"read": 3000.0 + size, "write": 4000.0}
            filtered = plain | {"filter:fault": 2000.0}
            points.append(
                _cpu_point("http", size, rate, plain, sum(plain.values()) + 15_000 + 2 * size)
            )
            points.append(_cpu_point("http+fault", size, rate, filtered,
                                     sum(filtered.values()) + 18_000 + 2 * size))  # fmt: skip
    profile = build_profile(
        [Setup("http", "http"), Setup("http+fault", "http", filters=("fault",))],
        points,
        current_platform(),
    )
    untimed = profile.untimed["http"]
    assert (untimed.base, untimed.per_byte, untimed.r2) == pytest.approx((15_000, 2.0, 1.0))
    assert profile.untimed["http+fault"].at(0) == pytest.approx(18_000)
    # the stage models and the untimed line add up to the external (whole-process) CPU model
    stages = sum(m.cpu.at(1024) for m in profile.modes["http"].values())
    assert stages + untimed.at(1024) == pytest.approx(profile.external["http"].cpu.at(1024))
    again = Profile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again.untimed == profile.untimed
    assert profile.external_view().untimed == {}
    flat_line = fit_untimed_cpu(
        [100.0, 200.0], [100, 100], [100.0 * 9000, 200.0 * 9000], [0.0, 0.0]
    )
    assert flat_line.base == pytest.approx(9000) and flat_line.per_byte == 0.0


def test_predict_adds_each_passes_untimed_cpu_and_no_latency():
    base = hand_profile()
    profile = dataclasses.replace(
        base, untimed={"http": Linear(10_000, 1.0), "http+fault": Linear(13_000, 1.0)}
    )
    graph = _f_calls_a(f_filters=("fault",))  # 100 /s, 100-byte messages
    without, p = predict(base, graph), predict(profile, graph)
    # three passes: f's inbound (r) and outbound (x) with fault, a's inbound (x) without
    assert p.cpu_stages["untimed"] == pytest.approx(100 * (13_100 + 13_100 + 10_100) / 1e9)
    assert p.cpu_cores - without.cpu_cores == pytest.approx(p.cpu_stages["untimed"])
    assert p.overhead_ns == pytest.approx(without.overhead_ns)
    assert "untimed" not in p.path_stages_ns
    off = predict(profile, graph, WhatIf.parse(["untimed=0"]))
    assert off.cpu_cores == pytest.approx(without.cpu_cores)
    with pytest.raises(WhatIfError, match="no stage 'untimed'"):
        predict(base, graph, WhatIf.parse(["untimed=2"]))


def test_profile_fits_what_a_pass_adds_to_the_app_behind_the_sidecar():
    # Known answer: the meshed echo costs 40 µs + 0.1 ns/B more per exchange than the plain one.
    sizes = [100, 1000, 4000]
    line = fit_app_cpu(sizes, [150_000 + 40_000 + 0.1 * s for s in sizes], [150_000.0] * 3)
    assert (line.base, line.per_byte) == (pytest.approx(40_000), pytest.approx(0.1))
    points = [_latency_point("http", s, 20_000.0, 30_000.0, {"read": 1000.0})
              | {"app_cpu_ns": {"mesh": 190_000 + 0.1 * s, "plain": 150_000.0}} for s in sizes]  # fmt: skip
    profile = build_profile([Setup("http", "http")], points, current_platform(), PODS)
    assert profile.app_cpu["http"].at(1000) == pytest.approx(40_100)
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))).app_cpu == profile.app_cpu
    # points without both echoes timed (loopback: one echo answers both paths) fit nothing
    plain = build_profile([Setup("http", "http")], [_latency_point("http", 100, 1.0, 2.0, {})],
                          current_platform())  # fmt: skip
    assert plain.app_cpu == {}


def test_predict_adds_the_apps_cpu_each_side_of_every_call_through_a_sidecar():
    # 20 µs per exchange for every http pass, 30 µs more on f's filtered one; 100 /s, 100 B.
    # r: f's app behind its inbound sidecar (the client is outside the mesh): 50 µs.
    # x: f's app through its outbound sidecar (50 µs) and a's behind its inbound one (20 µs).
    base = hand_profile()
    profile = dataclasses.replace(
        base, app_cpu={"http": Linear(20_000, 0.0), "http+fault": Linear(50_000, 0.0)}
    )
    graph = _f_calls_a(f_filters=("fault",))
    p, without = predict(profile, graph), predict(base, graph)
    hops = {h.call: h for h in p.hops}
    assert hops["r"].app_cpu_cores == pytest.approx(100 * 50_000 / 1e9)
    assert hops["x"].app_cpu_cores == pytest.approx(100 * 70_000 / 1e9)
    assert (hops["r"].outbound_app_ns, hops["r"].inbound_app_ns) == (0.0, pytest.approx(50_000))
    assert (hops["x"].outbound_app_ns, hops["x"].inbound_app_ns) == (
        pytest.approx(50_000),
        pytest.approx(20_000),
    )
    assert p.app_cpu_cores == pytest.approx(100 * 120_000 / 1e9)
    assert p.to_json()["app_cpu_overhead_cores"] == pytest.approx(p.app_cpu_cores)
    # beside the sidecars' own CPU, which it leaves as it was, as it leaves the latency
    assert (p.cpu_cores, p.overhead_ns) == (without.cpu_cores, without.overhead_ns)
    assert without.app_cpu_cores == 0.0
    # a whole profiled hop saw its callee's side: its caller's is taken to cost the same
    hop = dataclasses.replace(
        profile,
        modes=profile.modes | {"hop:http": profile.modes["http"]},
        app_cpu={"http": Linear(20_000, 0.0), "hop:http": Linear(25_000, 0.0)},
    )
    x = {h.call: h for h in predict(hop, _f_calls_a()).hops}["x"]
    assert x.whole == "hop:http" and x.app_cpu_cores == pytest.approx(100 * 50_000 / 1e9)


def test_a_profiled_combination_of_filters_prices_its_sidecars_as_measured():
    # Known answer: the profile measured http alone (7 µs of stages, 40 µs hand-off, 15 µs
    # untimed CPU) and http + fault + ratelimit as one setup (12 µs, 55 µs, 30 µs); a sidecar
    # with exactly those filters costs the combination's figures, not http's plus each
    # filter's difference (the profile has no single-filter setups here at all).
    points = []
    for setup, stages, gap, untimed in (
        ("http", {"read": 3000.0, "write": 4000.0}, 40_000.0, 15_000.0),
        ("http+fault+ratelimit",
         {"read": 3000.0, "write": 5000.0, "filter:fault": 2500.0, "filter:ratelimit": 1500.0},
         55_000.0, 30_000.0),
    ):  # fmt: skip
        points.append(_latency_point(setup, 100, 20_000.0, 20_000.0 + sum(stages.values()) + gap,
                                     stages))  # fmt: skip
        points.append(_cpu_point(setup, 100, 1000.0, stages, sum(stages.values()) + untimed))
    combo = setup_for("http", ["fault", "ratelimit"])
    assert (combo.name, combo.filters, combo.filter_type) == (
        "http+fault+ratelimit", ("fault", "ratelimit"), None
    )  # fmt: skip
    profile = build_profile([Setup("http", "http"), combo], points, current_platform())
    assert set(profile.modes) == {"http", "http+fault+ratelimit"} and profile.filters == {}
    graph = graph_from_data({
        "services": {"f": {"mode": "http", "filters": ["fault", "ratelimit"]},
                     "a": {"mode": "http"}},
        "calls": [{"id": "r", "callee": "f", "rate": 100, "work_us": 100},
                  {"id": "x", "parent": "r", "callee": "a", "work_us": 50}],
    })  # fmt: skip
    hops = {h.call: h for h in predict(profile, graph).hops}
    # r: f's inbound pass with the combination and its hand-off
    assert hops["r"].latency_ns == pytest.approx(12_000 + 55_000)
    assert hops["r"].cpu_cores == pytest.approx(100 * (12_000 + 30_000) / 1e9)
    # x: f's outbound (the combination) and a's inbound (plain http); the larger hand-off
    assert hops["x"].latency_ns == pytest.approx(12_000 + 7000 + 55_000)
    assert hops["x"].cpu_cores == pytest.approx(100 * (42_000 + 22_000) / 1e9)
    # the external view prices the combination as its own whole sidecar, not as a filter
    assert set(profile.external_view().filters) == set()
    # a sidecar with only one of the filters is not that combination: its filter is unknown
    only_fault = graph_from_data({"services": {"f": {"mode": "http", "filters": ["fault"]}},
                                  "calls": [{"id": "r", "callee": "f"}]})  # fmt: skip
    with pytest.raises(WhatIfError, match="filter 'fault' is not in the profile"):
        predict(profile, only_fault)


def test_pooled_blocks_give_each_point_the_median_over_the_blocks():
    # Known answer: three blocks of the same setup; the middle one was struck by other work
    # (its proxied latency 5 ms, its CPU doubled). Each pooled figure is the blocks' median,
    # the paced passes are all kept, and points that differ in kind, load or rate stay apart.
    blocks = []
    for proxied, cpu in ((150_000.0, 90_000.0), (5_000_000.0, 180_000.0), (160_000.0, 95_000.0)):
        blocks += [
            {"setup": "http", "kind": "latency", "size": 100, "rate": 2000.0,
             "direct_p50_ns": 40_000.0,
             "proxy_p50_ns": proxied, "proxy_cpu_ns_per_exchange": cpu,
             "stages_ns": {"read": 3000.0, "write": cpu / 10}},
            {"setup": "http", "kind": "cpu", "size": 100, "load": 0.5, "rate": 1000.0,
             "proxy_cpu_ns_per_s": 1000 * cpu, "stages_ns_per_s": {"read": 3e6}},
            {"setup": "http", "kind": "idle", "size": 100, "rate": 100.0, "paced_rate": 100.0,
             "direct_p50_ns": 50_000.0, "proxy_p50_ns": proxied + 20_000,
             "proxy_cpu_ns_per_exchange": cpu, "passes_overhead_ns": [proxied - 30_000]},
        ]  # fmt: skip
    merged = {p["kind"]: p for p in pooled(blocks)}
    assert len(pooled(blocks)) == 3 and all(p["blocks"] == 3 for p in merged.values())
    hot = merged["latency"]
    assert (hot["proxy_p50_ns"], hot["proxy_cpu_ns_per_exchange"]) == (160_000.0, 95_000.0)
    assert hot["stages_ns"] == {"read": 3000.0, "write": 9500.0}
    assert merged["cpu"]["proxy_cpu_ns_per_s"] == 95e6 and merged["cpu"]["load"] == 0.5
    assert merged["idle"]["proxy_p50_ns"] == 180_000.0
    assert merged["idle"]["passes_overhead_ns"] == [120_000.0, 4_970_000.0, 130_000.0]
    # fitted from the pooled points, the hand-off is the unstruck blocks' (160 - 40 - 12.5 µs)
    profile = build_profile([Setup("http", "http")], pooled(blocks), current_platform())
    assert profile.handoff["http"].latency.at(100) == pytest.approx(107_500)


def test_a_profiled_hop_prices_a_call_between_two_sidecars_of_its_setup_whole():
    # Known answer: one http pass measured 7 µs of stages, a 40 µs hand-off, 15 µs untimed CPU;
    # the whole hop (the caller's outbound and the callee's inbound sidecar, measured together)
    # 20 µs of stages, a 100 µs hand-off, 50 µs untimed CPU, and at 100 /s 30 µs more to wake.
    points = []
    for setup, stages, gap, untimed in (
        ("http", {"read": 3000.0, "write": 4000.0}, 40_000.0, 15_000.0),
        ("hop:http", {"read": 8000.0, "write": 12_000.0}, 100_000.0, 50_000.0),
    ):
        points.append(_latency_point(setup, 100, 20_000.0, 20_000.0 + sum(stages.values()) + gap,
                                     stages))  # fmt: skip
        points.append(_cpu_point(setup, 100, 1000.0, stages, sum(stages.values()) + untimed))
    hop = hop_setup(setup_for("http"))
    assert (hop.name, hop.mode, hop.hop, hop.filter_type) == ("hop:http", "http", True, None)
    profile = build_profile([Setup("http", "http"), hop], points, current_platform(), PODS)
    profile = dataclasses.replace(
        profile,
        idle={
            "hop:http": IdleCurve(
                ((100.0, 30_000.0, 4000.0), (110.0, 30_000.0, 4000.0), (1000.0, 0.0, 0.0))
            )
        },  # fmt: skip
    )
    graph = _f_calls_a()  # client → f → a at 100 /s, both http sidecars
    p = predict(profile, graph)
    hops = {h.call: h for h in p.hops}
    # r comes from outside the mesh: f's inbound pass alone, as before
    assert hops["r"].latency_ns == pytest.approx(7000 + 40_000) and not hops["r"].whole
    # x crosses f's outbound and a's inbound: the hop's own figures, each once
    x = hops["x"]
    assert x.whole == "hop:http"
    assert x.latency_ns == pytest.approx(20_000 + 100_000 + 30_000)
    assert x.cpu_cores == pytest.approx(100 * (20_000 + 50_000 + 4000) / 1e9)
    assert (x.outbound_ns, x.inbound_ns) == (pytest.approx(10_000), pytest.approx(10_000))
    assert p.overhead_ns == pytest.approx(47_000 + 150_000)
    # Pinned, with a busy share of 1 the hop's curve is two passes' worth: each pays half after
    # its own wait. a's inbound waited since the previous request (15 µs, 2 µs CPU), CPU 1
    # busy with f's outbound pass just before; f's outbound pass follows f's inbound one by
    # f's 100 µs of work, 10 kHz on a curve without gaps: nothing. Without a busy share the
    # curve is the first pass's, and that one's CPU idled only through f's work: nothing.
    placed = predict(dataclasses.replace(profile, busy_share={"http": 1.0}), graph,
                     placement=PINNED)  # fmt: skip
    assert placed.path_stages_ns["idle"] == pytest.approx(15_000)
    assert placed.cpu_stages["idle"] == pytest.approx(100 * 2000 / 1e9)
    assert predict(profile, graph, placement=PINNED).path_stages_ns["idle"] == 0.0
    # a what-if scales the hop's stages as it scales a pass's
    assert predict(profile, graph, WhatIf.parse(["handoff=0"])).overhead_ns == pytest.approx(
        7000 + 20_000 + 30_000
    )
    # a hop between sidecars of different setups, or switched to another IPC, is priced per pass
    mixed = with_services(graph, {"a": Service("a", "tcp")})
    profile_tcp = dataclasses.replace(profile, modes=profile.modes | {"tcp": profile.modes["http"]})
    assert not {h.call: h for h in predict(profile_tcp, mixed).hops}["x"].whole
    # the external view prices the hop whole from outside, and adds no filter for it
    assert profile.external_view().modes["hop:http"]["sidecar"].latency.at(100) == pytest.approx(
        120_000
    )
    assert profile.external_view().filters == {}


def test_on_a_shared_cpu_a_woken_callee_works_before_its_caller_takes_an_earlier_answer():
    """Of tasks that could start at once on a CPU, a process going on (it never waited) first,
    then the one that has run least in this request, as a fair scheduler picks: traced, a
    fan-out's later callee works before its caller, which has run longest, takes an earlier
    callee's answer."""
    graph = graph_from_data({"calls": [{"id": "a", "callee": "a", "work_us": 100, "app_us": 40}] + [
        {"id": x, "parent": "a", "callee": x, "group": 0, "work_us": 100, "client_us": 40,
         "app_us": 40} for x in "bcd"]})  # fmt: skip
    # Plain, all on CPU 0: every app's CPU in turn (a 120 + 3 × 20 + 3 × 140 + 3 × 20 + 20).
    assert schedule_latency(graph, PINNED, lambda call: HopCost())[0] == pytest.approx(680_000)
    # Meshed (µs): a's inbound 0-5, a 5-125 and sends b, c, d 125-185; b 185-305 and answers
    # 305-325 (going on); c, woken at 175, before d (both unrun), 325-465; then d, unrun,
    # 465-605, before a, whose answer from b waited since 335; a takes b's, c's and d's
    # answers (d's passed 605-615) 605-665, answers 665-685, its inbound half 685-690. Had a
    # taken b's and c's answers at 465, d's passes would have been on the path: 700.
    assert schedule_latency(graph, PINNED, _passes(10_000))[0] == pytest.approx(690_000)


def test_a_callers_client_work_sits_next_to_its_call_and_lets_the_other_calls_passes_overlap():
    split, lumped = _fanout_graph(), _fanout_graph()
    for call in split.calls():
        if call.parent is not None:
            call.client_ns = 40_000.0  # a's client side of b and of c: 20 µs sending, 20 taking
    lumped.root.app_ns = 80_000.0  # the same CPU as a's own, half before, half after its calls
    plain = lambda call: HopCost()  # noqa: E731
    # Plain, all on CPU 0: every app's CPU in turn, wherever it sits (3 × 100 + 80 µs).
    assert schedule_latency(split, PINNED, plain)[0] == pytest.approx(380_000)
    assert schedule_latency(lumped, PINNED, plain)[0] == pytest.approx(380_000)
    # Meshed, b's passes run on CPU 1 while a still sends c, and c's answer passes while a
    # takes b's answer: less of the sidecars' work is on the path than when a sent both
    # calls before either passed and took both answers after both passed.
    assert schedule_latency(split, PINNED, _passes(10_000))[0] == pytest.approx(390_000)
    assert schedule_latency(lumped, PINNED, _passes(10_000))[0] == pytest.approx(415_000)
    # A chain has nothing to overlap: where the caller's client work sits changes nothing.
    chain = graph_from_data({"calls": [{"id": "a", "callee": "a", "work_us": 100},
                                       {"id": "b", "parent": "a", "callee": "b", "work_us": 100,
                                        "client_us": 40}]})  # fmt: skip
    assert chain.root.children[0].client_ns == 40_000.0
    lumped_chain = graph_from_data({"calls": [{"id": "a", "callee": "a", "work_us": 100,
                                               "app_us": 40},
                                              {"id": "b", "parent": "a", "callee": "b",
                                               "work_us": 100}]})  # fmt: skip
    for g in (chain, lumped_chain):
        assert schedule_latency(g, PINNED, plain)[0] == pytest.approx(240_000)
        assert schedule_latency(g, PINNED, _passes(10_000))[0] == pytest.approx(270_000)
