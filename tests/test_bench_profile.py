"""A tiny real `bench profile` run: proxies, echo upstreams, the driver, the fits and the plots."""

from __future__ import annotations

import json

import pytest
from pyproxy.bench.callgraph import graph_from_data
from pyproxy.bench.model import Profile, check_platform, current_platform
from pyproxy.bench.predict import WhatIf, predict

from pyproxy.cli import main


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    argv = ["bench", "profile", "--modes", "tcp", "--ipc", "tcp,unix", "--filters", "",
            "--sizes", "100,2048", "--seconds", "0.1", "--idle-rates", "300", "--busy-turns", "2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_profile_fits_every_stage_from_real_runs_and_keys_it_by_platform(profiled):
    profile = Profile.load(profiled / "profile.json")
    assert check_platform(profile, current_platform(), force=False) == []
    assert profile.platform["backends"] == ["tcp", "unix"]
    tcp = profile.modes["tcp"]
    assert {"ipc", "read", "write", "notify"} <= set(tcp)
    # Bytes went through: the syscall stages cost something at both sizes.
    assert tcp["write"].latency.at(100) > 0 and tcp["ipc"].latency.at(2048) > 0
    assert "unix" in profile.ipc and set(profile.external) == {"tcp", "tcp+ipc:unix"}
    kinds = [(p["setup"], p["kind"]) for p in profile.points]
    assert kinds.count(("tcp", "latency")) == 2 and kinds.count(("tcp", "cpu")) == 8
    # The idle curve: paced points at the smallest size only, below the closed-loop rate.
    idle = [p for p in profile.points if p["kind"] == "idle"]
    assert {p["size"] for p in idle} == {100} and {p["paced_rate"] for p in idle} == {300.0}
    curve = profile.idle["tcp"]
    hot_rate = curve.points[-1][0]
    assert hot_rate > 300 and curve.at(hot_rate) == (0.0, 0.0) and curve.points[0][0] == 300
    # The hand-off: what the client saw added beyond the stage clock's sum, per size.
    [small] = [
        p for p in profile.points if (p["setup"], p["kind"], p["size"]) == ("tcp", "latency", 100)
    ]
    gap = small["proxy_p50_ns"] - small["direct_p50_ns"] - sum(small["stages_ns"].values())
    handoff = profile.handoff["tcp"]
    assert abs(handoff.latency.at(100) - gap) <= handoff.spread_ns + 1e-6
    # The busy share: two sidecars taking turns and one paced, on the TCP setup only.
    [busy] = [p for p in profile.points if p["kind"] == "busy"]
    assert (busy["setup"], busy["turns"], busy["size"]) == ("tcp", 2, 100)
    for kind in ("one", "turns", "paced"):
        assert len(busy[f"{kind}_cpu_ns"]) == 3 and min(busy[f"{kind}_stage_ns"]) > 0
    assert set(profile.busy_share) == {"tcp"} and 0.0 <= profile.busy_share["tcp"] <= 1.0
    for p in profile.points:
        if p["kind"] == "busy":
            continue
        if p["kind"] == "latency":
            assert p["exchanges"] > 0 and p["proxy_p50_ns"] > 0
        elif p["kind"] == "cpu":
            assert p["rate"] > 0 and p["proxy_cpu_ns_per_s"] >= 0
        else:
            assert p["rate"] > 0 and p["proxy_cpu_ns_per_exchange"] > 0


def test_profile_writes_a_reproducible_results_folder_with_plots(profiled):
    inputs = json.loads((profiled / "inputs.json").read_text())
    assert inputs["sizes"] == [100, 2048] and inputs["setups"] == ["tcp", "tcp+ipc:unix"]
    assert json.loads((profiled / "summary.json").read_text()) == {
        "interrupted": False,
        "skipped": {},
    }
    # 2 setups × 2 sizes × (1 latency + 4 CPU points), 1 idle point per setup, 1 busy point
    assert len((profiled / "points.csv").read_text().splitlines()) == 1 + 2 * 2 * 5 + 2 + 1
    for plot in ("stages.png", "latency_vs_size.png", "cpu_vs_rate.png"):
        assert (profiled / plot).stat().st_size > 1000


def test_a_measured_profile_drives_predict_and_what_if(profiled):
    profile = Profile.load(profiled / "profile.json")
    graph = graph_from_data({
        "services": {"a": {"mode": "tcp"}, "b": {"mode": "tcp"}},
        "calls": [{"id": "r", "callee": "a", "rate": 10}, {"id": "x", "parent": "r", "callee": "b"}],
    })  # fmt: skip
    plain = predict(profile, graph)
    assert plain.overhead_ns > 0 and plain.cpu_cores > 0
    unix = predict(profile, graph, WhatIf.parse(["ipc=unix"]))
    assert unix.overhead_ns != plain.overhead_ns


def test_report_inlines_the_plots_and_the_models_table(profiled, capsys):
    assert main(["bench", "report", str(profiled)]) == 0
    page = (profiled / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<td>tcp</td><td>write</td>" in page and "*external*" in page
    assert main(["bench", "report", str(profiled), "--format", "markdown"]) == 0
    assert "![stages](stages.png)" in (profiled / "report.md").read_text()


def test_report_of_a_folder_without_results_says_so(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert "no profile.json" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pyproxy.bench.procs import tree_pids

    argv = [sys.executable, "-m", "pyproxy", "bench", "profile", "--modes", "tcp,http", "--ipc", "tcp",
            "--filters", "", "--sizes", "100,2048,4096", "--seconds", "0.2", "--busy-turns", "0",
            "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    children: list[int] = []
    while time.monotonic() < deadline:  # the progress bar's description names the running point
        children = tree_pids(proc.pid)[1:] or children
        line = proc.stderr.readline()
        if "tcp 2048 B" in line or "1/6" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    profile = Profile.load(tmp_path / "profile.json")
    assert "tcp" in profile.modes and "http" not in profile.modes
    assert any(p["setup"] == "tcp" and p["size"] == 100 for p in profile.points)
    assert children and not [pid for pid in children if os.path.exists(f"/proc/{pid}")]


def test_profile_http2_mode_speaks_h2c_on_both_sides(tmp_path):
    """HTTP/2 is profiled as an http listener with h2c on both sides: the driver's client, the
    proxy, and the h2c echo upstream, each exchange's body echoed whole."""
    argv = ["bench", "profile", "--modes", "http2", "--ipc", "tcp", "--filters", "",
            "--sizes", "100,2048", "--seconds", "0.1", "--idle-rates", "", "--busy-turns", "0",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    profile = Profile.load(tmp_path / "profile.json")
    stages = profile.modes["http2"]
    # HTTP/2 framing is parsed both ways: parse costs something at both sizes.
    assert stages["parse"].latency.at(100) > 0 and stages["parse"].latency.at(2048) > 0
    latency = [p for p in profile.points if p["kind"] == "latency"]
    assert {p["size"] for p in latency} == {100, 2048}
    assert all(p["exchanges"] > 0 and p["proxy_p50_ns"] > 0 for p in latency)


def test_http2_exchanger_refuses_a_short_echo():
    """The driver checks what came back: an h2c upstream answering with the wrong body length
    is an error, not a measured exchange."""
    import socket
    import threading

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import StreamEnded
    from pyproxy.bench.driver import Http2Exchanger

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_short() -> None:
        sock, _ = listener.accept()
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        while data := sock.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, StreamEnded):
                    conn.send_headers(event.stream_id, [(b":status", b"200")])
                    conn.send_data(event.stream_id, b"short", end_stream=True)
            sock.sendall(conn.data_to_send())
        sock.close()

    threading.Thread(target=serve_short, daemon=True).start()
    exchanger = Http2Exchanger(f"127.0.0.1:{port}", 100)
    try:
        with pytest.raises(ConnectionError, match="5 B body"):
            exchanger.exchange()
    finally:
        exchanger.close()
        listener.close()


@pytest.mark.parametrize("protocol", ["tcp", "http", "grpc"])
def test_echo_work_is_spun_before_every_answer_on_both_paths(tmp_path, protocol):
    """With --echo-work-us the echoes (the direct one and the one behind the proxy) spin that
    long before each answer: both paths' round trips take at least the work, so the added
    latency still measures the proxy alone, while its CPU idles between request and answer."""
    argv = ["bench", "profile", "--modes", protocol, "--ipc", "tcp", "--filters", "",
            "--sizes", "100", "--seconds", "0.1", "--idle-rates", "", "--echo-work-us", "3000",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    [hot] = [p for p in Profile.load(tmp_path / "profile.json").points if p["kind"] == "latency"]
    assert hot["echo_work_us"] == 3000
    assert hot["direct_p50_ns"] >= 3_000_000 and hot["proxy_p50_ns"] >= 3_000_000
    assert json.loads((tmp_path / "inputs.json").read_text())["echo_work_us"] == 3000


class _CountingTarget:
    """A profile target whose proxy's counters move by fixed steps per stats() read: each
    proxied exchange two lane reads (one of them whole), one read event, 1 µs of read stage."""

    def __init__(self) -> None:
        from pyproxy.bench.profile import Setup

        self.setup = Setup("grpc", "grpc", "tcp", ())
        self.work_us, self.pids, self.reads = 0.0, [], 0
        self.app_pids: dict[str, list[int]] = {}  # one echo for both paths, as on loopback

    def stats(self) -> dict:
        n = self.reads
        self.reads += 10  # the next read: 10 exchanges later (the fake pair's)
        return {"stages": {"read": {"ns": 1000 * n, "events": n}},
                "lane_reads": {"all": 2 * n, "whole": n}}  # fmt: skip

    def pair(self, size: int):
        class _Pair:
            def paired(self, seconds, rate=None, warmup=0):
                return [100_000] * 10, [200_000] * (10 - warmup), 0.01

            def paced(self, seconds, rate):
                return 10, 0.01

            def close(self):
                pass

        return _Pair()


def test_a_latency_point_records_lane_reads_and_stage_events_a_proxied_exchange():
    from pyproxy.bench.profile import measure_size

    [latency] = [p for p in measure_size(_CountingTarget(), 100, 0.01, 0) if p["kind"] == "latency"]
    assert latency["lane_reads"] == {"all": 2.0, "whole": 1.0}
    assert latency["stage_events"] == {"read": 1.0}
    assert "app_cpu_ns" not in latency  # one echo answered both paths: nothing to tell apart


def test_a_whole_grpc_hop_is_driven_as_the_validation_apps_call_and_a_pass_as_the_load():
    from pyproxy.bench.driver import GRPC_CALLER
    from pyproxy.bench.profile import Setup, driver_protocol

    assert driver_protocol(Setup("hop:grpc", "grpc", hop=True)) == GRPC_CALLER
    assert driver_protocol(Setup("grpc", "grpc")) == "grpc"
    assert driver_protocol(Setup("hop:http", "http", hop=True)) == "http"


def test_the_future_client_exchanges_with_the_grpc_echo():
    import threading

    from conftest import free_port
    from pyproxy.bench.driver import EXCHANGERS, GRPC_CALLER, wait_ready
    from pyproxy.bench.echo_server import serve_grpc

    port = free_port()
    threading.Thread(target=serve_grpc, args=(port,), daemon=True).start()
    wait_ready(GRPC_CALLER, f"127.0.0.1:{port}")
    exchanger = EXCHANGERS[GRPC_CALLER](f"127.0.0.1:{port}", 100)
    try:
        for _ in range(3):
            exchanger.exchange()
    finally:
        exchanger.close()


def test_the_speed_probe_times_each_cpu_it_has():
    import os

    from pyproxy.bench.procs import speed_probe

    speeds = speed_probe((0, 1, 4096), rounds=2)
    assert set(speeds) == {c for c in (0, 1) if c < (os.cpu_count() or 1)}
    assert all(0 < us < 1e6 for us in speeds.values())
