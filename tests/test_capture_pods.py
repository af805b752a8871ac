"""End to end: two pods, each an app plus a pyproxy sidecar (uid 1337) behind `pyproxy capture apply`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyproxy.iptables.netns import Pod, pods
from pyproxy.native.bpf import cgroup_pin_dirs

PY = sys.executable
PROXY_UID = 1337
APP_PORT = 8080
BYPASS_PORT = 9000
SIZE = 10 * 1024 * 1024  # each direction
FETCH = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=3) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)


@dataclass
class Sidecar:
    pod: Pod
    proc: subprocess.Popen

    def fetch(
        self, path: str, host: str = "127.0.0.1", port: int = 15000, uid: int | None = None
    ) -> str:
        url = f"http://{host}:{port}{path}"
        return self.pod.run([PY, "-c", FETCH, url], uid=uid, timeout=10).stdout

    def stats(self) -> dict:
        return json.loads(self.fetch("/stats?format=json"))["listeners"]

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sidecar in {self.pod.role} exited: {self.proc.stderr.read()}"
                )  # type: ignore[union-attr]
            with contextlib.suppress(Exception):
                self.fetch("/ready")
                return
            time.sleep(0.2)
        raise AssertionError(f"sidecar in {self.pod.role} not ready after {timeout}s")


def start_sidecar(pod: Pod, mode: str) -> Sidecar:
    argv = [PY, "-m", "pyproxy", "run", "--sidecar", "--mode", "tcp", "--admin", "127.0.0.1:15000"]
    argv += ["--capture-mode", mode]
    # Under TPROXY the inbound listener needs IP_TRANSPARENT, hence CAP_NET_ADMIN (as Istio grants);
    # under eBPF capture it reads the original destinations' map, hence CAP_BPF.
    caps = {"tproxy": ("net_admin",), "ebpf": ("bpf",)}.get(mode, ())
    proc = pod.popen(
        argv, uid=PROXY_UID, caps=caps, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sidecar = Sidecar(pod, proc)
    sidecar.wait_ready()
    return sidecar


def start_echo(pod: Pod, port: int) -> None:
    proc = pod.popen(
        [PY, "-m", "pyproxy.iptables.probe", "echo", "--port", str(port), "--lifetime", "120"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"  # type: ignore[union-attr]


def capture_apply(pod: Pod, *args: str) -> None:
    result = pod.run([PY, "-m", "pyproxy", "capture", "apply", *args], timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def bulk(pod: Pod, host: str, port: int, size: int) -> dict:
    argv = [
        PY,
        "-m",
        "pyproxy.iptables.probe",
        "bulk",
        host,
        str(port),
        "--bytes",
        str(size),
        "--timeout",
        "30",
    ]
    return json.loads(pod.run(argv, timeout=90).stdout)


def settled(read, check, timeout: float = 5.0):
    """Counters are folded in when a connection closes; poll briefly for the final values."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if check(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@dataclass
class Mesh:
    a: Pod
    b: Pod
    sidecar_a: Sidecar
    sidecar_b: Sidecar


@contextlib.contextmanager
def mesh(mode: str, *capture_args: str) -> Iterator[Mesh]:
    # The eBPF capture attaches to each pod's own cgroup.
    with pods(("a", "b"), bridge=True, cgroups=mode == "ebpf") as made:
        a, b = made["a"], made["b"]
        for pod in (a, b):
            capture_apply(pod, "--mode", mode, *capture_args)
        start_echo(b, APP_PORT)
        start_echo(b, BYPASS_PORT)
        yield Mesh(a, b, start_sidecar(a, mode), start_sidecar(b, mode))
        for pod in (a, b):
            pod.run([PY, "-m", "pyproxy", "capture", "clean"], timeout=60)
            if pod.cgroup is not None:
                assert cgroup_pin_dirs(pod.cgroup) == [], "clean left eBPF pins behind"


def exact(listener: dict) -> dict:
    return {
        "connections_total": listener["connections_total"],
        "bytes": listener["bytes"],
    }


def expected(connections: int, size: int) -> dict:
    return {
        "connections_total": connections,
        "bytes": {
            "downstream_rx": size,
            "downstream_tx": size,
            "upstream_rx": size,
            "upstream_tx": size,
        },
    }


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["redirect", "tproxy", "ebpf"])
def test_pod_to_pod_bytes_pass_both_sidecars_unchanged(require_netns, mode, family):
    with mesh(mode) as m:
        target = m.b.address(family)
        result = bulk(m.a, target, APP_PORT, SIZE)
        assert result["intact"], result
        assert result["received"] == SIZE
        stats_a = settled(
            m.sidecar_a.stats, lambda s: s["outbound"]["bytes"]["upstream_rx"] >= SIZE
        )
        stats_b = settled(m.sidecar_b.stats, lambda s: s["inbound"]["bytes"]["upstream_rx"] >= SIZE)
        # Exactly one connection each: A's outbound and B's inbound saw the app's bytes, and neither
        # sidecar's own upstream connection was captured again (a loop would add connections).
        assert exact(stats_a["outbound"]) == expected(1, SIZE)
        assert exact(stats_b["inbound"]) == expected(1, SIZE)
        assert stats_a["inbound"]["connections_total"] == 0
        assert stats_b["outbound"]["connections_total"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_excluded_ports_and_cidrs_bypass_both_sidecars(require_netns, family):
    with mesh(
        "redirect",
        "--exclude-outbound-ports",
        str(BYPASS_PORT),
        "--exclude-inbound-ports",
        str(BYPASS_PORT),
    ) as m:
        target = m.b.address(family)
        assert bulk(m.a, target, BYPASS_PORT, 64 * 1024)["intact"]
        assert m.sidecar_a.stats()["outbound"]["connections_total"] == 0
        assert m.sidecar_b.stats()["inbound"]["connections_total"] == 0
        # The app port is still captured on both sides.
        assert bulk(m.a, target, APP_PORT, 64 * 1024)["intact"]
        assert (
            settled(m.sidecar_a.stats, lambda s: s["outbound"]["connections_total"])["outbound"][
                "connections_total"
            ]
            == 1
        )
        # Re-applying A's capture with B's addresses excluded takes A's sidecar out of that path.
        capture_apply(m.a, "--exclude-outbound-cidrs", f"{m.b.ipv4}/32,{m.b.ipv6}/128")
        assert bulk(m.a, target, APP_PORT, 64 * 1024)["intact"]
        assert m.sidecar_a.stats()["outbound"]["connections_total"] == 1
        b_inbound = settled(m.sidecar_b.stats, lambda s: s["inbound"]["connections_total"] >= 2)
        assert b_inbound["inbound"]["connections_total"] == 2


def test_metrics_and_health_ports_are_never_captured(require_netns):
    with mesh("redirect") as m:
        # A scraper without a sidecar (uid 1337 is not captured in A) reaches B's sidecar directly.
        metrics = m.sidecar_a.fetch("/metrics", host=m.b.ipv4, port=15090, uid=PROXY_UID)  # type: ignore[arg-type]
        assert "pyproxy" in metrics
        m.sidecar_a.fetch("/healthz/ready", host=m.b.ipv4, port=15021, uid=PROXY_UID)  # type: ignore[arg-type]
        assert m.sidecar_b.stats()["inbound"]["connections_total"] == 0


def loaded_programs(names: tuple[str, ...]) -> set[int]:
    listing = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    return {p["id"] for p in json.loads(listing.stdout or "[]") if p.get("name") in names}


def test_ebpf_capture_excludes_the_proxy_uid_and_clean_unloads_everything(require_netns):
    from pyproxy.native import ebpf_capture

    names = ("pp_connect4", "pp_connect6", "pp_cap_sockops")
    with mesh("ebpf") as m:
        shown = m.a.run([PY, "-m", "pyproxy", "capture", "show"]).stdout
        for part in (*names, "pp_cap_orig", "link_connect4", "link_connect6", "link_sockops"):
            assert part in shown, shown
        capture_apply(m.a, "--mode", "ebpf")  # idempotent: replaces, never stacks
        ours = loaded_programs(names)
        assert len(ours) == 2 * len(names)  # one set per pod
        # The proxy's uid goes straight to B; A's sidecar sees nothing of it.
        argv = [PY, "-m", "pyproxy.iptables.probe", "bulk", m.b.ipv4, str(APP_PORT), "--bytes"]
        result = json.loads(m.a.run([*argv, "65536"], uid=PROXY_UID).stdout)  # type: ignore[list-item]
        assert result["intact"]
        assert m.sidecar_a.stats()["outbound"]["connections_total"] == 0
        # An app connection is diverted, and the sidecar consumed its original destination.
        assert bulk(m.a, m.b.ipv4, APP_PORT, 65536)["intact"]  # type: ignore[arg-type]
        assert (
            settled(m.sidecar_a.stats, lambda s: s["outbound"]["connections_total"])["outbound"][
                "connections_total"
            ]
            == 1
        )
        assert ebpf_capture.pin_dir(m.a.cgroup).exists()  # type: ignore[arg-type]
    # mesh() ran `capture clean` in both pods and checked the pins; the programs are gone too.
    assert settled(lambda: loaded_programs(names) & ours, lambda left: not left) == set()
