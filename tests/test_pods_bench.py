"""The pod echo benchmark runs end to end with a tiny bounded load and reports both paths and both sidecars."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pyproxy.iptables.netns import list_namespaces
from test_sockmap import require_sockmap  # noqa: F401  (the fixture, used by name below)

STREAM = 2 * 1024 * 1024


@pytest.mark.parametrize("instrument", ["c", "python"])
def test_pod_echo_reports_baseline_sidecars_and_stage_breakdown(
    require_netns, tmp_path, instrument
):
    out = tmp_path / "pod_echo"
    argv = [sys.executable, "-m", "pyproxy.bench.pod_echo", "--count", "200", "--warmup", "20"]
    argv += ["--max-seconds", "10", "--output", str(out), "--instrument", instrument]
    argv += ["--stream-bytes", str(STREAM), "--streams", "3"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=100)
    assert proc.returncode == 0, stderr
    report = json.loads((out / "results.json").read_text())
    assert json.loads((out / "inputs.json").read_text())["count"] == 200
    assert report["baseline"]["count"] == 200
    assert report["sidecars"]["count"] == 200
    # Three streams per path; the median one is reported, the others beside it.
    for path in ("baseline", "sidecars"):
        stream = report[path]["stream"]
        assert sorted(stream["mb_per_s_all"])[1] == stream["mb_per_s"]
    assert 0 < report["baseline"]["p50_us"] <= report["baseline"]["p99_us"]
    for name in ("a_outbound", "b_inbound"):
        stage = report["stages"][name]
        assert stage["connections_total"] == 1 + 3  # the round trips', then the streams'
        # 220 messages of 100 bytes and three streams crossed each sidecar in both directions.
        crossed = 220 * 100 + 3 * STREAM
        assert stage["bytes"]["downstream_rx"] == stage["bytes"]["upstream_rx"] == crossed
        assert stage["total_us_per_message"] > 0
    # Every namespace the bench created (named after its pid) is gone.
    assert not [n for n in list_namespaces() if n.startswith(f"pp{proc.pid}-")]


@pytest.mark.usefixtures("require_sockmap")
def test_compare_runs_iptables_and_ebpf_capture_with_the_app_leg_redirected_by_sockmap(tmp_path):
    out = tmp_path / "compare"
    argv = [sys.executable, "-m", "pyproxy.bench.pod_echo", "--compare", "1", "--count", "100"]
    argv += ["--warmup", "10", "--sizes", "100,4096", "--stream-bytes", str(STREAM)]
    argv += ["--max-seconds", "10", "--output", str(out), "--cpu", "1"]  # all on one CPU
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr
    report = json.loads((out / "results.json").read_text())
    assert report["params"]["cpu"] == 1
    (measured,) = report["rounds"]
    assert measured["order"] == ["iptables", "ebpf_sockmap"]
    iptables, ebpf = measured["iptables"], measured["ebpf_sockmap"]
    assert (iptables["capture_mode"], iptables["sockmap"]) == ("redirect", False)
    assert (ebpf["capture_mode"], ebpf["sockmap"]) == ("ebpf", True)
    # The app's two connections (one per size) and its stream reached sidecar A over sockmap,
    # counted by the kernel program; on the iptables path they stayed loopback TCP.
    assert ebpf["a_outbound_ipc_path"]["path"] == "sockmap"
    assert ebpf["a_outbound_ipc_path"]["connections_redirected"] == 3
    assert ebpf["a_outbound_ipc_path"]["connections_bypassed"] == 0
    assert iptables["a_outbound_ipc_path"]["path"] == "tcp"
    for path in (iptables, ebpf):
        sizes = path["sidecars"]["sizes"]
        assert sizes["100"]["count"] == sizes["4096"]["count"] == 100
        assert path["sidecars"]["stream"]["bytes"] == STREAM
        outbound = path["stages"]["a_outbound"]
        assert outbound["connections_total"] == 3
        # Every byte crossed sidecar A both ways: 110 messages per size, then the stream.
        assert outbound["bytes"]["downstream_rx"] == 110 * (100 + 4096) + STREAM
        assert outbound["bytes"]["upstream_rx"] == outbound["bytes"]["downstream_rx"]
    summary = report["summary"]
    assert set(summary["sizes"]) == {"100", "4096"}
    ratio = summary["sizes"]["100"]["added_p50_ratio"]
    added = [path["added_latency_us"]["100"]["p50"] for path in (iptables, ebpf)]
    assert ratio["median"] == ratio["min"] == ratio["max"] == added[1] / added[0]
    assert summary["stream_mb_per_s"]["ebpf_sockmap"]["median"] > 0
    assert not [n for n in list_namespaces() if n.startswith(f"pp{proc.pid}-")]
