"""Capture with real iptables rules in real network namespaces: apply, clean, rollback, and where traffic lands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pyproxy.iptables import probe as probe_module
from pyproxy.iptables.capture import parse_save
from pyproxy.iptables.netns import Pod, pods
from pyproxy.iptables.rules import CaptureOptions, build_ruleset

PY = sys.executable
PROXY_UID = 1337


@pytest.fixture
def pair(require_netns):
    with pods(("a", "b"), bridge=True) as made:
        yield made["a"], made["b"]


@pytest.fixture
def pod(require_netns):
    with pods(("solo",), bridge=True) as made:
        yield made["solo"]


def capture(pod: Pod, *args: str, env: dict[str, str] | None = None, path: str | None = None):
    """Run `pyproxy capture ...` inside the pod, as an init container would."""
    environment = {
        "PATH": path or os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        **(env or {}),
    }
    return subprocess.run(
        pod.command([PY, "-m", "pyproxy.iptables.cli", *args]),
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


def applied(pod: Pod, *args: str, env: dict[str, str] | None = None) -> None:
    result = capture(pod, "apply", *args, env=env)
    assert result.returncode == 0, result.stderr


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def state(pod: Pod) -> str:
    """Everything capture may touch: both families' rules, policy routing, tables, lo addresses."""
    parts = []
    for argv in (
        ["iptables-save"],
        ["ip6tables-save"],
        ["ip", "-4", "rule", "show"],
        ["ip", "-6", "rule", "show"],
        ["ip", "-4", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
        ["ip", "addr", "show", "dev", "lo"],
    ):
        out = pod.run(argv).stdout
        # iptables-save stamps its comment lines with the time and its chain lines with packet
        # counters (a stray neighbour-discovery packet bumps PREROUTING's), and eth0's link-local
        # address appears whenever autoconfiguration gets to it; nothing else varies by itself.
        out = _COUNTERS.sub("[0:0]", out)
        parts.append(
            "\n".join(
                line for line in out.splitlines() if not line.startswith("#") and "fe80" not in line
            )
        )
    return "\n--\n".join(parts)


def install_foreign_state(pod: Pod) -> None:
    """Rules, chains, routes and an address that belong to someone else and must survive clean."""
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        net = "10.0.0.0/8" if family == 4 else "fd00:1::/64"
        for argv in (
            [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "RETURN"],
            [tool, "-t", "nat", "-N", "FOREIGN_CHAIN"],
            [tool, "-t", "nat", "-A", "FOREIGN_CHAIN", "-d", net, "-j", "RETURN"],
            [tool, "-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN_CHAIN"],
            [
                tool,
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                "udp",
                "-j",
                "MARK",
                "--set-mark",
                "7",
            ],
            [tool, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
        ):
            pod.run(argv)
    pod.run(["ip", "-4", "rule", "add", "fwmark", "0x7", "lookup", "77"])
    pod.run(["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "77"])
    # Someone else's ::6 (not tagged by pyproxy): apply must use it, clean must leave it.
    pod.run(["ip", "-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])


# --- apply / clean / idempotence / rollback -------------------------------------------------


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_clean_restores_a_fresh_pod_exactly(pod, mode):
    before = state(pod)
    applied(pod, "--mode", mode)
    during = state(pod)
    assert "PYPROXY_OUTPUT" in during and "::6/128" in during
    if mode == "tproxy":
        assert "fwmark 0x539 lookup 133" in during
    result = capture(pod, "clean", "--mode", mode)
    assert result.returncode == 0, result.stderr
    assert state(pod) == before


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_clean_removes_only_what_apply_installed(pod, mode):
    install_foreign_state(pod)
    before = state(pod)
    applied(pod, "--mode", mode)
    during = state(pod)
    # Foreign rules stay in force while the capture is installed.
    for line in before.splitlines():
        if "FOREIGN_CHAIN" in line or "--dport 9999" in line or "lookup 77" in line:
            assert line in during
    result = capture(pod, "clean", "--mode", mode)
    assert result.returncode == 0, result.stderr
    assert state(pod) == before


def test_apply_is_idempotent_and_mode_switches_leave_one_set(pod):
    applied(pod)
    once = state(pod)
    applied(pod)
    assert state(pod) == once
    applied(pod, "--mode", "tproxy")
    applied(pod, "--mode", "tproxy")
    tproxy = state(pod)
    assert tproxy.count("-A PREROUTING -p tcp -j PYPROXY_INBOUND") == 2  # mangle, IPv4 + IPv6
    assert tproxy.count("fwmark 0x539 lookup 133") == 2
    applied(pod)
    assert state(pod) == once
    save = parse_save(pod.run(["iptables-save"]).stdout)
    assert save["nat"].jumps() == [
        "-A PREROUTING -p tcp -j PYPROXY_INBOUND",
        "-A OUTPUT -p tcp -j PYPROXY_OUTPUT",
    ]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_installed_rules_are_exactly_the_generated_ones(pod, family, mode):
    args = [
        "--mode",
        mode,
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,fd00:96::/64",
        "--outbound-ports",
        "80,443",
    ]
    applied(pod, *args, "--exclude-inbound-ports", "22")
    opts = CaptureOptions(
        mode=mode,
        exclude_outbound_cidrs=("10.96.0.0/12", "fd00:96::/64"),
        outbound_ports=(80, 443),
        exclude_inbound_ports=(22,),
    )
    save = parse_save(pod.run(["iptables-save" if family == 4 else "ip6tables-save"]).stdout)
    for table in build_ruleset(opts, family).tables:
        installed = save[table.name]
        ours = [
            r
            for r in installed.rules
            if r in installed.jumps() or r.split()[1].startswith("PYPROXY_")
        ]
        # iptables-save groups rules by chain; within a chain the order must be ours exactly.
        for chain in {r.split()[1] for r in table.rules}:
            assert [r for r in ours if r.split()[1] == chain] == [
                r for r in table.rules if r.split()[1] == chain
            ]
        assert set(installed.ours()) == set(table.chains) | {"PYPROXY_OWNED_TABLE"}


def test_failed_apply_rolls_back_everything(pod):
    # A route someone else put in table 133 makes the kernel refuse our IPv6 local route,
    # after the IPv4 rules, IPv4 routing and IPv6 rules were already installed.
    pod.run(["ip", "-6", "route", "add", "unreachable", "::/0", "table", "133"])
    before = state(pod)
    result = capture(pod, "apply", "--mode", "tproxy")
    assert result.returncode == 1
    assert "rolled back" in result.stderr and "File exists" in result.stderr
    assert state(pod) == before


def test_failed_reapply_restores_the_previous_capture(pod):
    applied(pod, "--exclude-outbound-ports", "53")
    before = state(pod)
    pod.run(["ip", "-6", "route", "add", "unreachable", "::/0", "table", "133"])
    result = capture(pod, "apply", "--mode", "tproxy")
    assert result.returncode == 1, result.stdout
    after = state(pod)
    pod.run(["ip", "-6", "route", "del", "unreachable", "::/0", "table", "133"])
    assert (
        after.replace("unreachable default dev lo table 133 metric 1024 pref medium\n", "")
        == before
    )


def test_missing_tool_is_refused_before_anything_is_touched(pod, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("iptables-restore", "iptables-save", "ip"):  # no ip6tables-*
        (bin_dir / tool).symlink_to(shutil.which(tool))
    before = state(pod)
    result = capture(pod, "apply", path=str(bin_dir))
    assert result.returncode == 1
    assert "ip6tables-restore" in result.stderr
    assert state(pod) == before


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--mode", "masquerade"], {}),
        (["--exclude-inbound-ports", "0"], {}),
        (["--outbound-ports", "80,65536"], {}),
        (["--exclude-outbound-cidrs", "10.88.0.0/33"], {}),
        ([], {"PYPROXY_EXCLUDE_OUTBOUND_CIDRS": "10.88.0.1/16"}),
        ([], {"PYPROXY_CAPTURE_MODE": "bpf"}),
    ],
)
def test_bad_options_are_refused_before_any_rule_is_touched(pod, args, env):
    applied(pod, "--exclude-outbound-ports", "53")
    before = state(pod)
    for action in ("apply", "clean"):
        result = capture(pod, action, *args, env=env)
        assert result.returncode == 2
        assert "invalid" in result.stderr
        assert state(pod) == before


def test_show_reports_the_installed_capture(pod):
    applied(pod, "--mode", "tproxy")
    result = capture(pod, "show")
    assert result.returncode == 0, result.stderr
    assert "-A PYPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in result.stdout
    assert "fwmark 0x539 lookup 133" in result.stdout
    assert "::6/128 (added by pyproxy)" in result.stdout
    dry = capture(pod, "clean", "--dry-run")
    assert dry.returncode == 0 and "PYPROXY_TPROXY" in dry.stdout
    assert "PYPROXY_TPROXY" in state(pod)  # --dry-run changed nothing


# --- where connections land -------------------------------------------------------------------


def start_tag(pod: Pod, port: int, tag: str, transparent: bool = False, uid: int | None = None):
    argv = [
        PY,
        "-m",
        "pyproxy.iptables.probe",
        "tag",
        "--port",
        str(port),
        "--tag",
        tag,
        "--lifetime",
        "60",
    ]
    if transparent:
        argv.append("--transparent")
    proc = pod.popen(argv, uid=uid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert line == "READY", proc.stderr.read() if proc.poll() is not None else line  # type: ignore[union-attr]
    return proc


@pytest.fixture(scope="module")
def app_probe(tmp_path_factory) -> list[str]:
    """The probe as an app user runs it: the base interpreter and a world-readable copy.

    An app's uid need not reach this checkout or its venv (only the sidecar's uid 1337 is given
    that by the set-up: a clone in root's home is mode 0700); the probe needs only the stdlib.
    """
    folder = Path(tempfile.mkdtemp(prefix="pyproxy-app-probe-"))
    folder.chmod(0o755)
    probe = folder / "probe.py"
    shutil.copyfile(Path(probe_module.__file__), probe)
    probe.chmod(0o644)
    yield [sys._base_executable, str(probe)]  # type: ignore[attr-defined]
    shutil.rmtree(folder)


def ask(
    pod: Pod,
    host: str,
    port: int,
    uid: int | None = None,
    gid: int | None = None,
    source: str | None = None,
    probe: list[str] | None = None,
):
    argv = [*(probe or [PY, "-m", "pyproxy.iptables.probe"]), "ask", host, str(port)]
    if source:
        argv += ["--source", source]
    return json.loads(pod.run(argv, uid=uid, gid=gid).stdout)


def bracket(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("family", [4, 6])
def test_outbound_connection_is_redirected_to_15001_with_its_original_destination(pair, family):
    a, b = pair
    start_tag(a, 15001, "a-outbound")
    start_tag(b, 8080, "b-app")
    target = b.address(family)
    assert ask(a, target, 8080)["tag"] == "b-app"  # no capture yet
    applied(a)
    got = ask(a, target, 8080)
    assert got["tag"] == "a-outbound"
    assert got["original_dst"] == bracket(target, 8080)


@pytest.mark.parametrize("family", [4, 6])
def test_proxy_uid_and_gid_are_never_captured(pair, family, app_probe):
    a, b = pair
    start_tag(a, 15001, "a-outbound")
    start_tag(b, 8080, "b-app")
    applied(a)
    target = b.address(family)
    assert ask(a, target, 8080, uid=1000, gid=1000, probe=app_probe)["tag"] == "a-outbound"
    assert ask(a, target, 8080, uid=PROXY_UID)["tag"] == "b-app"
    assert ask(a, target, 8080, uid=1000, gid=PROXY_UID, probe=app_probe)["tag"] == "b-app"


@pytest.mark.parametrize("family", [4, 6])
def test_excluded_outbound_ports_and_cidrs_bypass_the_sidecar(pair, family):
    a, b = pair
    start_tag(a, 15001, "a-outbound")
    start_tag(b, 8080, "b-app")
    start_tag(b, 8081, "b-app-2")
    target = b.address(family)
    applied(a, "--exclude-outbound-ports", "8080")
    assert ask(a, target, 8080)["tag"] == "b-app"
    assert ask(a, target, 8081)["tag"] == "a-outbound"
    applied(a, "--exclude-outbound-cidrs", f"{b.ipv4}/32,{b.ipv6}/128")
    assert ask(a, target, 8080)["tag"] == "b-app"
    assert ask(a, target, 8081)["tag"] == "b-app-2"
    # An include list that does not cover B leaves B alone; one that does captures it.
    applied(a, "--outbound-cidrs", "192.0.2.0/24,2001:db8::/32")
    assert ask(a, target, 8081)["tag"] == "b-app-2"
    applied(a, "--outbound-cidrs", "10.88.0.0/24,fd00:88::/64", "--outbound-ports", "8081")
    assert ask(a, target, 8081)["tag"] == "a-outbound"
    assert ask(a, target, 8080)["tag"] == "b-app"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_inbound_connection_reaches_15006_and_reserved_ports_never_do(pair, family, mode):
    a, b = pair
    start_tag(b, 15006, "b-inbound", transparent=mode == "tproxy")
    start_tag(b, 8080, "b-app")
    start_tag(b, 9000, "b-app-excluded")
    start_tag(b, 15090, "b-metrics")
    start_tag(b, 15021, "b-health")
    start_tag(b, 15000, "b-admin")
    applied(b, "--mode", mode, "--exclude-inbound-ports", "9000")
    target = b.address(family)
    got = ask(a, target, 8080)
    assert got["tag"] == "b-inbound"
    if mode == "redirect":
        assert got["original_dst"] == bracket(target, 8080)
    else:
        # TPROXY does not rewrite the packet: the accepted socket's local address is the destination.
        assert got["local"] == bracket(target, 8080)
    assert ask(a, target, 9000)["tag"] == "b-app-excluded"
    for port, tag in ((15090, "b-metrics"), (15021, "b-health"), (15000, "b-admin")):
        assert ask(a, target, port)["tag"] == tag


@pytest.mark.parametrize("family", [4, 6])
def test_loopback_handling_app_to_own_pod_ip_and_passthrough_source(pod, family):
    start_tag(pod, 15001, "outbound")
    start_tag(pod, 15006, "inbound")
    start_tag(pod, 8080, "app")
    applied(pod)
    own = pod.address(family)
    loopback = "127.0.0.1" if family == 4 else "::1"
    # The app calling its own pod IP is outbound traffic first ...
    got = ask(pod, own, 8080)
    assert (got["tag"], got["original_dst"]) == ("outbound", bracket(own, 8080))
    # ... and the sidecar relaying it to the pod IP comes back through inbound.
    got = ask(pod, own, 8080, uid=PROXY_UID)
    assert (got["tag"], got["original_dst"]) == ("inbound", bracket(own, 8080))
    # The inbound sidecar delivering to the app from the passthrough source is not recaptured,
    # whoever it runs as; plain localhost traffic is never captured.
    source = "127.0.0.6" if family == 4 else "::6"
    assert ask(pod, own, 8080, source=source)["tag"] == "app"
    assert ask(pod, loopback, 8080)["tag"] == "app"
