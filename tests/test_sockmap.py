"""ipc: sockmap in a real pod (netns + cgroup v2): the app's bytes go socket to socket, exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import http_get, recv_exactly, require_capability, start_listener
from pyproxy.bench.procs import halt_poll_ns, halt_poll_refused
from pyproxy.bench.sockmap_echo import PLACEMENTS
from pyproxy.iptables.netns import Pod, missing_capabilities, mount_point, pods
from pyproxy.native import bpf, sockmap
from test_capture_pods import PY, Sidecar, bulk, settled, start_echo

from pyproxy.config import ConfigError, build_config

MULTIARCH = sysconfig.get_config_var("MULTIARCH") or ""
SIDECAR_PORT = 15001
ECHO_PORT = 9000
BULK = 64 * 1024 * 1024
CONFIG = f"""\
admin: 127.0.0.1:15000
listeners:
  - name: app
    address: 127.0.0.1:{SIDECAR_PORT}
    mode: tcp
    upstream: 127.0.0.1:{ECHO_PORT}
    app_side: downstream
    ipc: sockmap
"""


@pytest.fixture(scope="module")
def require_sockmap() -> None:
    missing = missing_capabilities()
    if mount_point("cgroup2") is None:
        missing.append("cgroup v2")
    reason = sockmap.unavailable_reason()
    if reason:
        missing.append(reason)
    require_capability("sockmap pods: " + ", ".join(missing), not missing)


def probe(pod: Pod, *args: str) -> dict:
    argv = [PY, "-m", "pyproxy.iptables.probe", *args]
    return json.loads(pod.run(argv, timeout=120).stdout)


def outside_cgroup(pod: Pod) -> Pod:
    """The same network namespace, but processes started from it are not in the pod's cgroup."""
    return dataclasses.replace(pod, cgroup=None, _processes=[])


@contextlib.contextmanager
def sockmap_pods(tmp_path: Path, roles: tuple[str, ...]) -> Iterator[dict[str, Sidecar]]:
    """Pods (netns + cgroup) each with an echo app and a sidecar relaying to it over ipc: sockmap."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG)
    with pods(roles, bridge=True, cgroups=True) as made:
        pins = [sockmap.pin_dir(pod.cgroup) for pod in made.values()]  # type: ignore[arg-type]
        try:
            sidecars = {}
            for role, pod in made.items():
                start_echo(pod, ECHO_PORT)
                proc = pod.popen(
                    [PY, "-m", "pyproxy", "run", "-c", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                sidecars[role] = Sidecar(pod, proc)
                sidecars[role].wait_ready()
            yield sidecars
            for sidecar in sidecars.values():
                sidecar.proc.send_signal(signal.SIGTERM)  # its own exit must unpin everything
                sidecar.proc.wait(15)
        finally:
            leftover = [str(p) for p in pins if p.exists()]
            for directory in pins:
                bpf.remove_pins(directory)  # even on failure nothing stays pinned
        assert not leftover, f"the sidecars left {leftover} behind"


@contextlib.contextmanager
def sockmap_pod(tmp_path: Path) -> Iterator[tuple[Pod, Sidecar]]:
    with sockmap_pods(tmp_path, ("s",)) as sidecars:
        yield sidecars["s"].pod, sidecars["s"]


def server_info(sidecar: Sidecar) -> dict:
    return json.loads(sidecar.fetch("/server_info"))


def ipc_path(sidecar: Sidecar) -> dict:
    return server_info(sidecar)["io_backends"]["listeners"]["app"]["ipc_path"]


def test_sockmap_carries_small_messages_bulk_half_close_and_reset_exactly(
    require_sockmap, tmp_path
):
    with sockmap_pod(tmp_path) as (pod, sidecar):
        info = server_info(sidecar)
        assert "sockmap" in info["io_backends"]["available"]["ipc"], info["io_backends"]
        assert ipc_path(sidecar)["path"] == "sockmap"
        small = probe(pod, "pingpong", "127.0.0.1", str(SIDECAR_PORT), "--count", "300")
        assert small == {"messages": 300, "mismatched": [], "eof_after": True}
        # 64 MB each way, the app half-closes after sending and reads until the echo's EOF.
        big = probe(pod, "bulk", "127.0.0.1", str(SIDECAR_PORT), "--bytes", str(BULK))
        assert big["intact"] and big["received"] == BULK, big
        assert probe(pod, "reset", "127.0.0.1", str(SIDECAR_PORT)) == {"echoed": "before the reset"}
        stats = settled(sidecar.stats, lambda s: s["app"]["connections_active"] == 0)["app"]
        assert stats["flags"] == {"DR": 1}  # the reset reached the sidecar as a downstream reset
        assert stats["connections_total"] == 3
        path = ipc_path(sidecar)
        assert path["connections_redirected"] == 3 and path["connections_bypassed"] == 0
        assert stats["ipc_connections"] == {"sockmap": 3, "tcp": 0}
        # The kernel moved every byte of the app leg, both ways, and nothing of the sidecar's
        # own leg to the echo app (a port it did not accept on).
        moved = server_info(sidecar)["io_backends"]["sockmap_messages"]
        app_leg = 2 * (sum(range(1, 301)) + BULK + len("before the reset"))
        assert moved["bytes_redirected"] == app_leg, moved
        assert moved["messages_passed"] == 0, moved
        metrics = sidecar.fetch("/stats/prometheus")
        assert (
            'pyproxy_ipc_connections_total{listener="app",mode="tcp",path="sockmap"} 3.0' in metrics
        )


def test_connection_from_outside_the_pod_cgroup_is_not_redirected(require_sockmap, tmp_path):
    with sockmap_pod(tmp_path) as (pod, sidecar):
        before = server_info(sidecar)["io_backends"]["sockmap_messages"]
        result = bulk(outside_cgroup(pod), "127.0.0.1", SIDECAR_PORT, 1024 * 1024)
        assert result["intact"], result
        stats = settled(sidecar.stats, lambda s: s["app"]["connections_active"] == 0)["app"]
        assert stats["ipc_connections"] == {"sockmap": 0, "tcp": 1}
        path = ipc_path(sidecar)
        assert path["connections_redirected"] == 0 and path["connections_bypassed"] == 1
        after = server_info(sidecar)["io_backends"]["sockmap_messages"]
        assert after["bytes_redirected"] == before["bytes_redirected"]


def test_two_pods_on_one_host_each_redirect_only_their_own_connections(require_sockmap, tmp_path):
    with sockmap_pods(tmp_path, ("a", "b")) as sidecars:
        a, b = sidecars["a"], sidecars["b"]
        assert sockmap.pin_dir(a.pod.cgroup) != sockmap.pin_dir(b.pod.cgroup)  # type: ignore[arg-type]
        # The same 4-tuples exist in both pods (127.0.0.1 -> 127.0.0.1:15001): one map each.
        argv = ["bulk", "127.0.0.1", str(SIDECAR_PORT), "--bytes", str(4 * 1024 * 1024)]
        for sidecar in (a, b):
            assert probe(sidecar.pod, *argv)["intact"]
        assert probe(a.pod, *argv)["intact"]
        counts = {
            role: ipc_path(sidecar)["connections_redirected"] for role, sidecar in sidecars.items()
        }
        assert counts == {"a": 2, "b": 1}


def test_sidecar_exit_removes_programs_maps_and_pins(require_sockmap, tmp_path):
    with sockmap_pod(tmp_path) as (pod, sidecar):
        pins = sockmap.pin_dir(pod.cgroup)  # type: ignore[arg-type]
        assert sorted(p.name for p in pins.iterdir()) == sorted(
            [*sockmap.MAPS, *sockmap.PROGRAMS, sockmap.LINK]
        )
        attached = subprocess.run(
            ["bpftool", "cgroup", "show", str(pod.cgroup)], capture_output=True, text=True
        )
        assert "pp_sockops" in attached.stdout
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(15) == 0
        assert not pins.exists()
        attached = subprocess.run(
            ["bpftool", "cgroup", "show", str(pod.cgroup)], capture_output=True, text=True
        )
        assert "pp_sockops" not in attached.stdout


def test_sidecar_outside_a_pod_cgroup_says_why_and_relays_over_tcp(
    start_proxy, tmp_path, echo_server
):
    # This test process (and so the proxy) sits in the root cgroup, or runs without root: either
    # way the sockmap path is refused with a reason and the listener carries bytes over TCP.
    proxy, port = start_listener(
        start_proxy,
        tmp_path,
        echo_server.address,
        "    app_side: downstream\n    ipc: sockmap",
        mode="tcp",
    )
    _, body = http_get(proxy.admin + "/server_info")
    path = json.loads(body)["io_backends"]["listeners"]["main"]["ipc_path"]
    assert path["path"] == "tcp" and path["sockmap_unavailable"], path
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"still relayed")
        assert recv_exactly(conn, 13) == b"still relayed"
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert stats["ipc_connections"] == {"tcp": 1}
    assert "ipc sockmap unavailable" in proxy.output


def test_verifier_log_is_shown_when_a_program_is_rejected(require_sockmap, tmp_path):
    source = tmp_path / "reject.bpf.c"
    # Reads past the end of the sock_ops context: the verifier refuses it.
    source.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        'SEC("sockops") int bad(struct bpf_sock_ops *ops) { return *((__u32 *)ops + 4096); }\n'
        'char _license[] SEC("license") = "GPL";\n'
    )
    compiled = tmp_path / "reject.bpf.o"
    argv = ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{MULTIARCH}"]
    subprocess.run([*argv, "-c", str(source), "-o", str(compiled)], check=True)
    with pytest.raises(bpf.BpfError) as info:
        bpf.LoadedObject(compiled)
    message = str(info.value)
    assert "BEGIN PROG LOAD LOG" in message and "invalid bpf_context access" in message, message


@pytest.mark.parametrize(
    ("listener", "reason"),
    [
        ("address: 127.0.0.1:15001, upstream: 127.0.0.1:9000", "needs app_side: downstream"),
        ("address: '127.0.0.1:0', upstream: 127.0.0.1:9000, app_side: downstream", "fixed port"),
        ("address: '[::1]:15001', upstream: 127.0.0.1:9000, app_side: downstream", "IPv4"),
    ],
)
def test_sockmap_config_that_cannot_be_redirected_is_refused(listener, reason):
    doc = yaml.safe_load(f"listeners:\n  - {{name: app, mode: tcp, ipc: sockmap, {listener}}}\n")
    with pytest.raises(ConfigError, match=reason) as info:
        build_config(doc)
    assert ".ipc" in str(info.value)  # the error names the field


@pytest.mark.usefixtures("require_sockmap")
def test_bare_echo_bench_runs_each_pair_of_programs_over_tcp_and_sockmap(tmp_path):
    out = tmp_path / "sockmap_echo"
    argv = [PY, "-m", "pyproxy.bench.sockmap_echo", "--only", "bare", "--rounds", "1"]
    argv += ["--per-round", "50", "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bare = json.loads((out / "results.json").read_text())["bare"]
    for pair in ("native_blocking", "native_one_cpu", "native_busy", "python"):
        for size in ("100", "1024", "4096", "10240"):
            result = bare[pair][size]
            assert result["tcp"]["count"] == result["sockmap"]["count"] == 50
            assert 0 < result["sockmap"]["p50_us"] <= result["sockmap"]["p99_us"]
            assert result["speedup"]["p50"] == round(
                result["tcp"]["p50_us"] / result["sockmap"]["p50_us"], 3
            )
    # The kernel redirected each pair's sockmap connections (4 sizes × 1 round) and no other.
    redirected = {port: c["connections_redirected"] for port, c in bare["redirected"].items()}
    assert redirected == {"7002": 4, "7004": 4, "7006": 4, "7008": 4}
    assert all(c["connections_bypassed"] == 0 for c in bare["redirected"].values())
    # One target line per pair, met or not, at the end of the report.
    lines = [line for line in (out / "table.md").read_text().splitlines() if "TARGET" in line]
    assert len(lines) == 4 and all("bare " in line for line in lines)


def test_halt_poll_option_is_refused_plainly_when_it_cannot_be_honoured():
    assert halt_poll_refused(None) is None
    assert "0 or more" in (halt_poll_refused(-1) or "")
    if halt_poll_ns() is None:
        assert "haltpoll" in (halt_poll_refused(1000) or "")
    else:
        assert halt_poll_refused(1000) is None
    # pod_echo and tcp_echo share the rule: both refuse a negative value before running anything.
    for bench in ("pod_echo", "tcp_echo"):
        argv = [PY, "-m", f"pyproxy.bench.{bench}", "--halt-poll-ns", "-5"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "0 or more" in proc.stderr, (bench, proc.stderr)


@pytest.mark.usefixtures("require_sockmap")
def test_bare_echo_bench_lets_idle_vcpus_poll_for_its_run_and_restores_the_setting(tmp_path):
    before = halt_poll_ns()
    wanted = (before or 0) + 12345
    out = tmp_path / "sockmap_echo"
    argv = [PY, "-m", "pyproxy.bench.sockmap_echo", "--only", "bare", "--rounds", "1"]
    argv += ["--per-round", "20", "--halt-poll-ns", str(wanted), "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if before is None:  # no haltpoll governor: refused up front, with what is missing
        assert proc.returncode == 2 and "haltpoll" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "results.json").read_text())["halt_poll_ns"] == wanted  # read back
    assert halt_poll_ns() == before
    lines = [line for line in (out / "table.md").read_text().splitlines() if "TARGET" in line]
    assert len(lines) == 4 and all(f"(idle vCPUs polling {wanted} ns)" in line for line in lines)


@pytest.mark.usefixtures("require_sockmap")
@pytest.mark.parametrize("instrument", ["c", "python"])
def test_sidecar_echo_bench_measures_the_app_directly_beside_each_listener_in_every_placement(
    tmp_path, instrument
):
    out = tmp_path / "sockmap_echo"
    argv = [PY, "-m", "pyproxy.bench.sockmap_echo", "--only", "sidecar", "--rounds", "2"]
    argv += ["--instrument", instrument]  # the C pair reaches the Unix listener too
    argv += ["--per-round", "50", "--bulk-bytes", str(1 << 20), "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "results.json").read_text())
    for placement in PLACEMENTS:
        result = report[placement]
        direct = result["direct"]["p50_us"]
        for name in ("tcp", "sockmap"):
            assert result["added_p50_us"][name] == round(result[name]["p50_us"] - direct, 3)
            # One recv of the request and one send of the reply on the app-facing socket.
            assert 2.0 <= result[name]["ipc_calls_per_message"] < 2.1
        # The sockmap listener's latency connections (one a round) took the redirect; the TCP
        # listener's did not.
        assert result["sockmap"]["ipc_connections"] == {"sockmap": 2, "tcp": 0}
        assert result["tcp"]["ipc_connections"] == {"tcp": 2}
        assert result["bulk_mb_s"]["sockmap"] > 0
        # Per round: the `ipc` stage from the sidecar's own counters, and the preemptions.
        for name in ("tcp", "sockmap", "uds"):
            rounds = result[name]["ipc_us_per_message_rounds"]
            assert len(rounds) == 2 and all(r > 0 for r in rounds)
            pooled = result[name]["ipc_us_per_message"]
            assert min(rounds) - 0.01 <= pooled <= max(rounds) + 0.01
            assert all(n >= 0 for n in result[name]["sidecar_preempted_rounds"])
            assert all(w >= 0 for w in result[name]["sidecar_waited_us_per_message_rounds"])
            assert len(result[name]["app_preempted_rounds"]) == 2
        cuts = result["ipc_stage_cut_rounds"]
        tcp, sm = result["tcp"], result["sockmap"]
        expected = [
            round(1 - s / t, 3)
            for t, s in zip(
                tcp["ipc_us_per_message_rounds"], sm["ipc_us_per_message_rounds"], strict=True
            )
        ]
        assert cuts == pytest.approx(expected, abs=0.002)
        assert result["ipc_stage_cut"] == pytest.approx(sum(cuts) / 2, abs=0.002)
        assert "ipc_stage_cut_pooled" in result


@pytest.mark.usefixtures("require_sockmap")
def test_sidecar_fifo_diagnostic_keeps_woken_apps_out_of_the_sidecar_and_says_so(tmp_path):
    out = tmp_path / "sockmap_echo"
    argv = [PY, "-m", "pyproxy.bench.sockmap_echo", "--only", "sidecar", "--rounds", "2"]
    argv += ["--per-round", "200", "--bulk-bytes", str(1 << 20), "--sidecar-fifo"]
    proc = subprocess.run(
        [*argv, "--output", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "results.json").read_text())
    # No task of the ordinary class preempts a FIFO sidecar: what the app and the echo do when
    # its sends wake them waits until it blocks (a few RT kernel threads may still run first).
    for placement in PLACEMENTS:
        for name in ("tcp", "sockmap"):
            assert sum(report[placement][name]["sidecar_preempted_rounds"]) < 2 * 400 * 0.05
    lines = [line for line in (out / "table.md").read_text().splitlines() if "TARGET" in line]
    assert len(lines) == 2 * len(PLACEMENTS) and all(
        "(diagnostic: sidecar SCHED_FIFO)" in line for line in lines
    )
