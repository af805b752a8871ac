"""A tiny real `cold_passes` run: sidecars taking turns and one paced, through real proxies."""

from __future__ import annotations

import json
import os

from pyproxy.bench import cold_passes


def test_taking_turns_and_paced_points_are_measured_through_the_sidecars(tmp_path):
    cpus = os.sched_getaffinity(0)
    argv = ["--mode", "http", "--sidecars", "2", "--calls", "60", "--rounds", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert cold_passes.main(argv) == 0
    assert os.sched_getaffinity(0) == cpus  # the driver was pinned for the while only
    result = json.loads((tmp_path / "results.json").read_text())
    [point] = result["points"]
    assert (point["kind"], point["turns"]) == ("busy", 2)
    for kind in ("one", "turns", "paced"):
        # the sidecars' own stage clock and CPU saw every call, in each round
        assert len(point[f"{kind}_cpu_ns"]) == 2
        assert min(point[f"{kind}_stage_ns"]) > 0 and min(point[f"{kind}_cpu_ns"]) > 0
    for r in range(2):
        # taking turns with another, a sidecar waits at least the other's round trip; paced at
        # twice the round's one-sidecar round trip, each call and the wait after it take at
        # least that long
        assert point["turns_gap_ns"][r] >= 0.99 * point["turns_round_trip_ns"][r]
        period = 2 * point["one_round_trip_ns"][r]
        assert point["paced_gap_ns"][r] + point["paced_round_trip_ns"][r] >= 0.99 * period
    assert "| 2 |" in (tmp_path / "table.md").read_text()
