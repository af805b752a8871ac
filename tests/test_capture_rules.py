"""Capture rule generation and option validation: pure, no root, no namespaces."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pyproxy.iptables import cli
from pyproxy.iptables.rules import (
    CaptureOptionError,
    CaptureOptions,
    build_rules,
    build_ruleset,
    describe,
    options_from_strings,
)

DEFAULT_V4 = """\
*nat
:PYPROXY_INBOUND - [0:0]
:PYPROXY_IN_REDIRECT - [0:0]
:PYPROXY_OUTPUT - [0:0]
:PYPROXY_REDIRECT - [0:0]
-A PYPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PYPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j PYPROXY_INBOUND
-A PYPROXY_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A PYPROXY_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A PYPROXY_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A PYPROXY_INBOUND -p tcp -j PYPROXY_IN_REDIRECT
-A OUTPUT -p tcp -j PYPROXY_OUTPUT
-A PYPROXY_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A PYPROXY_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j PYPROXY_IN_REDIRECT
-A PYPROXY_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A PYPROXY_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j PYPROXY_IN_REDIRECT
-A PYPROXY_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A PYPROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A PYPROXY_OUTPUT -p tcp -j PYPROXY_REDIRECT
COMMIT
"""


def rules_of(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_default_ipv4_redirect_rules_are_the_istio_style_set():
    assert build_rules(CaptureOptions(), 4) == DEFAULT_V4


def test_ipv6_rules_use_ipv6_loopback_and_passthrough_source():
    text = build_rules(CaptureOptions(), 6)
    assert "-A PYPROXY_OUTPUT -s ::6/128 -o lo -j RETURN" in text
    assert (
        "-A PYPROXY_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j PYPROXY_IN_REDIRECT"
        in text
    )
    assert "-A PYPROXY_OUTPUT -d ::1/128 -j RETURN" in text
    assert "127.0.0" not in text
    # Same structure as IPv4 otherwise.
    assert len(text.splitlines()) == len(DEFAULT_V4.splitlines())


def test_passthrough_source_and_proxy_owner_are_checked_before_any_redirect():
    out = rules_of(build_rules(CaptureOptions(), 4), "PYPROXY_OUTPUT")
    redirect_at = out.index("-A PYPROXY_OUTPUT -p tcp -j PYPROXY_REDIRECT")
    assert out.index("-A PYPROXY_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN") == 0
    # The proxy calling its own pod IP goes to inbound *before* its other traffic is let through.
    lo_to_inbound = out.index(
        "-A PYPROXY_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j PYPROXY_IN_REDIRECT"
    )
    owner_return = out.index("-A PYPROXY_OUTPUT -m owner --uid-owner 1337 -j RETURN")
    assert lo_to_inbound < owner_return < redirect_at


def test_custom_proxy_uid_and_no_gid():
    text = build_rules(CaptureOptions(proxy_uid=2000, proxy_gid=None), 4)
    assert "--uid-owner 2000 -j RETURN" in text
    assert "--gid-owner" not in text
    assert "1337" not in text


def test_custom_capture_ports():
    text = build_rules(CaptureOptions(inbound_capture_port=16006, outbound_capture_port=16001), 4)
    assert "-A PYPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in text
    assert "-A PYPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in text


def test_admin_health_and_metrics_ports_are_excluded_even_when_listed_for_capture():
    opts = CaptureOptions(inbound_ports=(8080, 15000, 15090, 15021))
    inbound = rules_of(build_rules(opts, 4), "PYPROXY_INBOUND")
    assert inbound == [
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 8080 -j PYPROXY_IN_REDIRECT",
    ]


def test_include_inbound_ports_captures_only_those():
    inbound = rules_of(build_rules(CaptureOptions(inbound_ports=(9090, 80)), 4), "PYPROXY_INBOUND")
    jumps = [r for r in inbound if r.endswith("-j PYPROXY_IN_REDIRECT")]
    assert jumps == [
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 80 -j PYPROXY_IN_REDIRECT",
        "-A PYPROXY_INBOUND -p tcp -m tcp --dport 9090 -j PYPROXY_IN_REDIRECT",
    ]


def test_no_inbound_ports_means_no_inbound_capture():
    inbound = rules_of(build_rules(CaptureOptions(inbound_ports=()), 4), "PYPROXY_INBOUND")
    assert not [r for r in inbound if "PYPROXY_IN_REDIRECT" in r]


def test_exclude_inbound_ports_return_before_the_capture_jump():
    inbound = rules_of(
        build_rules(CaptureOptions(exclude_inbound_ports=(22, 8443)), 4), "PYPROXY_INBOUND"
    )
    assert inbound.index("-A PYPROXY_INBOUND -p tcp -m tcp --dport 22 -j RETURN") < len(inbound) - 1
    assert "-A PYPROXY_INBOUND -p tcp -m tcp --dport 8443 -j RETURN" in inbound
    assert inbound[-1] == "-A PYPROXY_INBOUND -p tcp -j PYPROXY_IN_REDIRECT"


def test_exclude_outbound_ports_and_cidrs_per_family():
    opts = CaptureOptions(
        exclude_outbound_ports=(53, 3306),
        exclude_outbound_cidrs=("10.96.0.0/12", "fd00:96::/64", "169.254.169.254/32"),
    )
    v4 = rules_of(build_rules(opts, 4), "PYPROXY_OUTPUT")
    v6 = rules_of(build_rules(opts, 6), "PYPROXY_OUTPUT")
    for rules in (v4, v6):
        redirect_at = rules.index("-A PYPROXY_OUTPUT -p tcp -j PYPROXY_REDIRECT")
        assert rules.index("-A PYPROXY_OUTPUT -p tcp -m tcp --dport 53 -j RETURN") < redirect_at
        assert rules.index("-A PYPROXY_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN") < redirect_at
    assert "-A PYPROXY_OUTPUT -d 10.96.0.0/12 -j RETURN" in v4
    assert "-A PYPROXY_OUTPUT -d 169.254.169.254/32 -j RETURN" in v4
    assert "-A PYPROXY_OUTPUT -d fd00:96::/64 -j RETURN" in v6
    assert not [r for r in v4 if "fd00" in r]
    assert not [r for r in v6 if "10.96" in r]


def test_include_outbound_ports_and_cidrs_are_combined():
    opts = CaptureOptions(outbound_ports=(80, 443), outbound_cidrs=("10.0.0.0/8", "fd00::/8"))
    v4 = [
        r
        for r in rules_of(build_rules(opts, 4), "PYPROXY_OUTPUT")
        if r.endswith("PYPROXY_REDIRECT")
    ]
    assert v4 == [
        "-A PYPROXY_OUTPUT -d 10.0.0.0/8 -p tcp -m tcp --dport 80 -j PYPROXY_REDIRECT",
        "-A PYPROXY_OUTPUT -d 10.0.0.0/8 -p tcp -m tcp --dport 443 -j PYPROXY_REDIRECT",
    ]
    v6 = [
        r
        for r in rules_of(build_rules(opts, 6), "PYPROXY_OUTPUT")
        if r.endswith("PYPROXY_REDIRECT")
    ]
    assert v6 == [
        "-A PYPROXY_OUTPUT -d fd00::/8 -p tcp -m tcp --dport 80 -j PYPROXY_REDIRECT",
        "-A PYPROXY_OUTPUT -d fd00::/8 -p tcp -m tcp --dport 443 -j PYPROXY_REDIRECT",
    ]


def test_include_cidrs_of_one_family_capture_nothing_of_the_other():
    opts = CaptureOptions(outbound_cidrs=("10.0.0.0/8",))
    v6 = rules_of(build_rules(opts, 6), "PYPROXY_OUTPUT")
    assert not [r for r in v6 if r.endswith("PYPROXY_REDIRECT")]


def test_no_outbound_cidrs_means_no_outbound_capture():
    v4 = rules_of(build_rules(CaptureOptions(outbound_cidrs=()), 4), "PYPROXY_OUTPUT")
    assert not [r for r in v4 if r.endswith("PYPROXY_REDIRECT")]


def test_tproxy_mode_diverts_inbound_in_mangle_and_keeps_outbound_in_nat():
    opts = CaptureOptions(mode="tproxy", exclude_inbound_ports=(22,))
    ruleset = build_ruleset(opts, 4)
    mangle = ruleset.table("mangle")
    nat = ruleset.table("nat")
    assert mangle is not None and nat is not None
    assert set(mangle.chains) == {"PYPROXY_INBOUND", "PYPROXY_DIVERT", "PYPROXY_TPROXY"}
    assert "-A PREROUTING -p tcp -j PYPROXY_INBOUND" in mangle.rules
    assert "-A PYPROXY_DIVERT -j MARK --set-xmark 0x539/0xffffffff" in mangle.rules
    assert (
        "-A PYPROXY_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0"
        " --tproxy-mark 0x539/0xffffffff"
    ) in mangle.rules
    inbound = [r for r in mangle.rules if r.startswith("-A PYPROXY_INBOUND")]
    assert inbound[-1] == "-A PYPROXY_INBOUND -p tcp -j PYPROXY_TPROXY"
    assert "-A PYPROXY_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in inbound
    assert "-A PYPROXY_INBOUND -p tcp -m tcp --dport 15090 -j RETURN" in inbound
    # Inbound is not also redirected by nat: no nat PREROUTING hook, no nat inbound chain.
    assert "PYPROXY_INBOUND" not in nat.chains
    assert not [r for r in nat.rules if r.startswith("-A PREROUTING")]
    assert "-A OUTPUT -p tcp -j PYPROXY_OUTPUT" in nat.rules
    assert ruleset.route_commands == (
        ("ip", "-4", "rule", "add", "fwmark", "0x539", "lookup", "133"),
        ("ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133"),
    )


def test_tproxy_ipv6_and_custom_mark_and_table():
    ruleset = build_ruleset(CaptureOptions(mode="tproxy", tproxy_mark=0x10, tproxy_table=77), 6)
    mangle = ruleset.table("mangle")
    assert mangle is not None
    assert (
        "-A PYPROXY_TPROXY ! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x10/0xffffffff"
        in mangle.rules
    )
    assert ruleset.route_commands[1] == (
        "ip",
        "-6",
        "route",
        "add",
        "local",
        "::/0",
        "dev",
        "lo",
        "table",
        "77",
    )


def test_redirect_mode_has_no_routing_and_no_mangle():
    ruleset = build_ruleset(CaptureOptions(), 6)
    assert ruleset.route_commands == ()
    assert ruleset.table("mangle") is None


def test_describe_covers_every_family_and_the_routing():
    text = describe(CaptureOptions(mode="tproxy"))
    assert "# IPv4: iptables-restore --noflush" in text
    assert "# IPv6: ip6tables-restore --noflush" in text
    assert "# ip -6 route add local ::/0 dev lo table 133" in text
    assert "::6/128 dev lo" in text
    only4 = describe(CaptureOptions(families=(4,)))
    assert "IPv6" not in only4


@pytest.mark.parametrize(
    ("kwargs", "option", "fragment"),
    [
        ({"mode": "nat"}, "mode", "unknown mode 'nat'"),
        ({"inbound_capture_port": 0}, "inbound_capture_port", "not a port"),
        ({"outbound_capture_port": 70000}, "outbound_capture_port", "not a port"),
        ({"outbound_capture_port": 15006}, "outbound_capture_port", "must differ"),
        ({"inbound_capture_port": 15000}, "inbound_capture_port", "reserved"),
        ({"exclude_inbound_ports": (22, 65536)}, "exclude_inbound_ports", "65536"),
        ({"inbound_ports": (True,)}, "inbound_ports", "not a port"),
        ({"outbound_ports": [80]}, "outbound_ports", "not a tuple"),
        (
            {"exclude_outbound_cidrs": ("10.0.0.300/32",)},
            "exclude_outbound_cidrs",
            "not a valid CIDR",
        ),
        (
            {"exclude_outbound_cidrs": ("10.1.2.3/8",)},
            "exclude_outbound_cidrs",
            "did you mean 10.0.0.0/8",
        ),
        ({"outbound_cidrs": ("fd00::/129",)}, "outbound_cidrs", "not a valid CIDR"),
        ({"proxy_uid": -1}, "proxy_uid", "not a numeric user"),
        ({"families": (5,)}, "families", "4 and 6"),
        ({"families": ()}, "families", "4 and 6"),
        ({"tproxy_table": 254}, "tproxy_table", "private routing table"),
        ({"tproxy_mark": 0}, "tproxy_mark", "mark"),
    ],
)
def test_invalid_options_are_refused_naming_the_option(kwargs, option, fragment):
    with pytest.raises(CaptureOptionError) as info:
        CaptureOptions(**kwargs)
    assert info.value.option == option
    assert fragment in str(info.value)


def test_options_from_strings_parse_lists_all_and_none():
    opts = options_from_strings(
        {
            "mode": "TPROXY",
            "inbound_ports": "*",
            "exclude_inbound_ports": "22, 8443 9000",
            "outbound_ports": "",
            "outbound_cidrs": "*",
            "exclude_outbound_cidrs": "10.96.0.0/12,fd00::/8",
            "families": "ipv4",
            "tproxy_mark": "0x10",
            "proxy_gid": "none",
        }
    )
    assert opts.mode == "tproxy"
    assert opts.inbound_ports == "*"
    assert opts.exclude_inbound_ports == (22, 8443, 9000)
    assert opts.outbound_ports == ()
    assert opts.exclude_outbound_cidrs == ("10.96.0.0/12", "fd00::/8")
    assert opts.families == (4,)
    assert opts.tproxy_mark == 0x10
    assert opts.proxy_gid is None


@pytest.mark.parametrize(
    ("values", "option"),
    [
        ({"inbound_ports": "80,http"}, "inbound_ports"),
        ({"exclude_outbound_ports": "*"}, "exclude_outbound_ports"),
        ({"proxy_uid": "proxy"}, "proxy_uid"),
        ({"families": "4,7"}, "families"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_options_from_strings_refuses_garbage(values, option):
    with pytest.raises(CaptureOptionError) as info:
        options_from_strings(values)
    assert info.value.option == option


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyproxy.iptables.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})},
    )


def test_dry_run_prints_the_rules_without_privileges():
    result = run_cli("apply", "--dry-run", "--mode", "tproxy", "--exclude-outbound-ports", "53")
    assert result.returncode == 0, result.stderr
    assert result.stdout == describe(CaptureOptions(mode="tproxy", exclude_outbound_ports=(53,)))


def test_environment_configures_an_init_container_and_flags_win():
    env = {
        "PYPROXY_CAPTURE_MODE": "tproxy",
        "PYPROXY_INBOUND_PORTS": "8080",
        "PYPROXY_EXCLUDE_OUTBOUND_CIDRS": "10.96.0.0/12",
        "PYPROXY_CAPTURE_FAMILIES": "4",
    }
    result = run_cli("show", "--dry-run", "--inbound-ports", "9090", env=env)
    assert result.returncode == 0, result.stderr
    expected = CaptureOptions(
        mode="tproxy",
        inbound_ports=(9090,),
        exclude_outbound_cidrs=("10.96.0.0/12",),
        families=(4,),
    )
    assert result.stdout == describe(expected)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--mode", "bpf"], {}, "--mode"),
        ([], {"PYPROXY_CAPTURE_MODE": "bpf"}, "PYPROXY_CAPTURE_MODE"),
        (["--exclude-inbound-ports", "99999"], {}, "--exclude-inbound-ports"),
        ([], {"PYPROXY_INBOUND_PORTS": "80,x"}, "PYPROXY_INBOUND_PORTS"),
        (["--exclude-outbound-cidrs", "10.0.0.0/33"], {}, "--exclude-outbound-cidrs"),
        ([], {"PYPROXY_EXCLUDE_OUTBOUND_CIDRS": "not-a-cidr"}, "PYPROXY_EXCLUDE_OUTBOUND_CIDRS"),
    ],
)
def test_bad_options_exit_2_with_a_message_naming_the_flag_or_variable(args, env, named):
    for action in ("apply", "clean", "show"):
        result = run_cli(action, *args, env=env)
        assert result.returncode == 2, (action, result.stdout, result.stderr)
        assert named in result.stderr
        assert result.stderr.startswith("pyproxy capture: error: invalid ")
        assert result.stdout == ""


def test_add_parser_registers_a_capture_subcommand_running_the_capture():
    parser = argparse.ArgumentParser(prog="pyproxy")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["capture", "apply", "--dry-run", "--families", "6"])
    assert args.func is cli.run
    assert args.action == "apply" and args.dry_run and args.families == "6"
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["capture", "install"])
    assert info.value.code == 2


def test_ebpf_mode_keeps_inbound_rules_and_leaves_outbound_to_the_connect_program():
    rules = build_rules(CaptureOptions(mode="ebpf"), 4)
    assert "-A PYPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-j PYPROXY_REDIRECT" not in rules  # nothing sends outbound traffic to 15001
    assert "-m owner --uid-owner 1337 -j RETURN" in rules
    with pytest.raises(CaptureOptionError, match="not implemented by the ebpf capture"):
        CaptureOptions(mode="ebpf", outbound_cidrs=("10.0.0.0/8",))
