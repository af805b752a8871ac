"""The pod echo benchmark runs end to end with a tiny bounded load and reports both paths and both sidecars."""

from __future__ import annotations

import json
import subprocess
import sys

from pyproxy.iptables.netns import list_namespaces


def test_pod_echo_reports_baseline_sidecars_and_stage_breakdown(require_netns, tmp_path):
    out = tmp_path / "pod_echo"
    argv = [sys.executable, "-m", "pyproxy.bench.pod_echo", "--count", "200", "--warmup", "20"]
    argv += ["--max-seconds", "10", "--output", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=100)
    assert proc.returncode == 0, stderr
    report = json.loads((out / "results.json").read_text())
    assert json.loads((out / "inputs.json").read_text())["count"] == 200
    assert report["baseline"]["count"] == 200
    assert report["sidecars"]["count"] == 200
    assert 0 < report["baseline"]["p50_us"] <= report["baseline"]["p99_us"]
    for name in ("a_outbound", "b_inbound"):
        stage = report["stages"][name]
        assert stage["connections_total"] == 1
        # 220 messages of 100 bytes crossed each sidecar in both directions.
        assert stage["bytes"]["downstream_rx"] == stage["bytes"]["upstream_rx"] == 220 * 100
        assert stage["total_us_per_message"] > 0
    # Every namespace the bench created (named after its pid) is gone.
    assert not [n for n in list_namespaces() if n.startswith(f"pp{proc.pid}-")]
