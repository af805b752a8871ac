"""A tiny real `cold_passes` run: sidecars taking turns and one paced, through real proxies."""

from __future__ import annotations

import json
import os

from pyproxy.bench import cold_passes


def test_rotation_and_paced_points_are_measured_through_the_sidecars(tmp_path):
    cpus = os.sched_getaffinity(0)  # the bench pins its driver (this process) to CPU 0
    try:
        argv = ["--mode", "http", "--sidecars", "2", "--calls", "60", "--rounds", "2",
                "--out", str(tmp_path)]  # fmt: skip
        assert cold_passes.main(argv) == 0
    finally:
        os.sched_setaffinity(0, cpus)
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["points"]) == {"rotation 1", "rotation 2", "paced 2"}
    for name, runs in result["rounds"].items():
        assert len(runs) == 2, name
        for point in runs:  # the sidecars' own stage clock and CPU saw every call
            assert point["stages_us"] > 0 and point["cpu_us"] > 0 and point["round_trip_us"] > 0
    # paced at twice one sidecar's round trip, the sidecar waits about one round trip between
    # calls; taking turns with another, about as long
    one = result["points"]["rotation 1"]["round_trip_us"]
    assert result["points"]["paced 2"]["gap_us"] > 0.5 * one
    assert result["points"]["rotation 2"]["gap_us"] > 0.5 * one
    assert "| 2 |" in (tmp_path / "table.md").read_text()
