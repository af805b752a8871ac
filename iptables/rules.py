"""Turn validated capture options into iptables-restore text and routing commands, touching nothing."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# ebpf: outbound by cgroup connect4/connect6 programs (native/capture.bpf.c, installed by
# iptables/capture.py), inbound by the same nat REDIRECT rules as redirect mode.
MODES = ("redirect", "tproxy", "ebpf")
ALL: Literal["*"] = "*"

# admin (15000), health (15021) and Prometheus (15090): never captured inbound, whatever the
# include list says, so an operator can always reach a sidecar whose capture is misconfigured.
RESERVED_INBOUND_PORTS = (15000, 15021, 15090)

CHAIN_PREFIX = "PYPROXY_"
INBOUND = "PYPROXY_INBOUND"
IN_REDIRECT = "PYPROXY_IN_REDIRECT"
OUTPUT = "PYPROXY_OUTPUT"
REDIRECT = "PYPROXY_REDIRECT"
DIVERT = "PYPROXY_DIVERT"
TPROXY = "PYPROXY_TPROXY"
# An empty chain apply adds to a table that did not exist before it, so that clean knows it may
# remove the whole table again and leave iptables-save exactly as it found it.
TABLE_MARKER = "PYPROXY_OWNED_TABLE"

# The inbound sidecar connects to the app from this address; its packets must not be recaptured.
PASSTHROUGH_SOURCE = {4: "127.0.0.6", 6: "::6"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
HOST_PREFIX = {4: 32, 6: 128}
ANY_ADDRESS = {4: "0.0.0.0", 6: "::"}
DEFAULT_ROUTE = {4: "0.0.0.0/0", 6: "::/0"}
RESTORE_COMMAND = {4: "iptables-restore", 6: "ip6tables-restore"}
SAVE_COMMAND = {4: "iptables-save", 6: "ip6tables-save"}

# Tables the kernel already uses; a TPROXY table must be a private one.
_RESERVED_ROUTE_TABLES = {0, 253, 254, 255}

Ports = tuple[int, ...] | Literal["*"]
Cidrs = tuple[str, ...] | Literal["*"]


class CaptureOptionError(ValueError):
    """An option value that capture refuses; `option` is the CaptureOptions field name."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.reason = message
        super().__init__(f"{option}: {message}")


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """What to capture and where to send it; validated and normalised on construction.

    `inbound_ports`, `outbound_ports` and `outbound_cidrs` are include lists: "*" means all,
    an empty tuple means none. Include CIDRs of the other family do not apply to a family, so
    an include list holding only IPv4 CIDRs captures no IPv6 outbound traffic.
    """

    mode: str = "redirect"
    inbound_capture_port: int = 15006
    outbound_capture_port: int = 15001
    proxy_uid: int = 1337
    proxy_gid: int | None = 1337
    inbound_ports: Ports = ALL
    exclude_inbound_ports: tuple[int, ...] = ()
    outbound_ports: Ports = ALL
    exclude_outbound_ports: tuple[int, ...] = ()
    outbound_cidrs: Cidrs = ALL
    exclude_outbound_cidrs: tuple[str, ...] = ()
    families: tuple[int, ...] = (4, 6)
    tproxy_mark: int = 0x539
    tproxy_table: int = 133

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CaptureOptionError(
                "mode", f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})"
            )
        for name in ("inbound_capture_port", "outbound_capture_port"):
            _check_port(name, getattr(self, name))
        if self.inbound_capture_port == self.outbound_capture_port:
            raise CaptureOptionError(
                "outbound_capture_port", "must differ from inbound_capture_port"
            )
        for name in ("inbound_capture_port", "outbound_capture_port"):
            if getattr(self, name) in RESERVED_INBOUND_PORTS:
                raise CaptureOptionError(
                    name, f"{getattr(self, name)} is reserved for admin/health/metrics"
                )
        _check_id("proxy_uid", self.proxy_uid)
        if self.proxy_gid is not None:
            _check_id("proxy_gid", self.proxy_gid)
        for name in ("inbound_ports", "outbound_ports"):
            value = getattr(self, name)
            if value != ALL:
                object.__setattr__(self, name, _normalise_ports(name, value))
        for name in ("exclude_inbound_ports", "exclude_outbound_ports"):
            object.__setattr__(self, name, _normalise_ports(name, getattr(self, name)))
        if self.outbound_cidrs != ALL and self.mode == "ebpf":
            raise CaptureOptionError(
                "outbound_cidrs",
                "include lists are not implemented by the ebpf capture; use exclude_outbound_cidrs",
            )
        if self.outbound_cidrs != ALL:
            object.__setattr__(
                self, "outbound_cidrs", _normalise_cidrs("outbound_cidrs", self.outbound_cidrs)
            )
        object.__setattr__(
            self,
            "exclude_outbound_cidrs",
            _normalise_cidrs("exclude_outbound_cidrs", self.exclude_outbound_cidrs),
        )
        families = self.families
        if (
            not isinstance(families, tuple)
            or not families
            or any(f not in (4, 6) for f in families)
        ):
            raise CaptureOptionError(
                "families", f"{families!r} is not a non-empty selection of 4 and 6"
            )
        object.__setattr__(self, "families", tuple(sorted(set(families))))
        if not _is_int(self.tproxy_mark) or not 1 <= self.tproxy_mark <= 0xFFFFFFFF:
            raise CaptureOptionError(
                "tproxy_mark", f"{self.tproxy_mark!r} is not a mark in 1..0xffffffff"
            )
        if (
            not _is_int(self.tproxy_table)
            or not 1 <= self.tproxy_table <= 0xFFFFFFFF
            or self.tproxy_table in _RESERVED_ROUTE_TABLES
        ):
            raise CaptureOptionError(
                "tproxy_table",
                f"{self.tproxy_table!r} is not a private routing table id (1..2^32-1, not 253-255)",
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_port(name: str, value: object) -> None:
    if not _is_int(value) or not 1 <= value <= 65535:  # type: ignore[operator]
        raise CaptureOptionError(name, f"{value!r} is not a port number in 1..65535")


def _check_id(name: str, value: object) -> None:
    if not _is_int(value) or not 0 <= value < 0xFFFFFFFF:  # type: ignore[operator]
        raise CaptureOptionError(name, f"{value!r} is not a numeric user/group id")


def _normalise_ports(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise CaptureOptionError(name, f"{value!r} is not a tuple of ports or '*'")
    for port in value:
        _check_port(name, port)
    return tuple(sorted(set(value)))


def _normalise_cidrs(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise CaptureOptionError(name, f"{value!r} is not a tuple of CIDRs or '*'")
    networks = []
    for cidr in value:
        if not isinstance(cidr, str):
            raise CaptureOptionError(name, f"{cidr!r} is not a CIDR")
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=True)
        except ValueError as exc:
            # Host bits set is the common typo (10.0.0.1/8 for 10.0.0.1/32); say which.
            try:
                suggestion = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise CaptureOptionError(name, f"{cidr!r} is not a valid CIDR ({exc})") from None
            raise CaptureOptionError(
                name, f"{cidr!r} has host bits set (did you mean {suggestion}?)"
            ) from None
        networks.append(network)
    unique = sorted(set(networks), key=lambda n: (n.version, n.network_address, n.prefixlen))
    return tuple(str(n) for n in unique)


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.replace(" ", ",").split(",") if item.strip()]


def _parse_int(name: str, text: str, base: int = 10) -> int:
    try:
        return int(text.strip(), base)
    except ValueError:
        raise CaptureOptionError(name, f"{text!r} is not a number") from None


def _parse_ports(name: str, text: str, allow_all: bool) -> Ports:
    if allow_all and text.strip() == ALL:
        return ALL
    ports = []
    for item in _split_list(text):
        if not item.isdigit():
            raise CaptureOptionError(name, f"{item!r} is not a port number in 1..65535")
        port = int(item)
        _check_port(name, port)
        ports.append(port)
    return tuple(ports)


def options_from_strings(values: Mapping[str, str]) -> CaptureOptions:
    """Build options from text values keyed by field name (flags, environment), as a user wrote them.

    Lists are comma- or space-separated; "*" means all; "" means none. Missing keys take the
    defaults. Raises CaptureOptionError naming the field.
    """
    known = {f.name for f in CaptureOptions.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    unknown = set(values) - known
    if unknown:
        name = sorted(unknown)[0]
        raise CaptureOptionError(name, "unknown option")
    kwargs: dict[str, object] = {}
    for name, text in values.items():
        if name == "mode":
            kwargs[name] = text.strip().lower()
        elif name in ("inbound_capture_port", "outbound_capture_port", "proxy_uid"):
            kwargs[name] = _parse_int(name, text)
        elif name == "proxy_gid":
            kwargs[name] = None if text.strip() in ("", "none") else _parse_int(name, text)
        elif name in ("inbound_ports", "outbound_ports"):
            kwargs[name] = _parse_ports(name, text, allow_all=True)
        elif name in ("exclude_inbound_ports", "exclude_outbound_ports"):
            kwargs[name] = _parse_ports(name, text, allow_all=False)
        elif name == "outbound_cidrs":
            kwargs[name] = ALL if text.strip() == ALL else tuple(_split_list(text))
        elif name == "exclude_outbound_cidrs":
            kwargs[name] = tuple(_split_list(text))
        elif name == "families":
            items = [item.lower().removeprefix("ipv") for item in _split_list(text)]
            if any(item not in ("4", "6") for item in items):
                raise CaptureOptionError(name, f"{text!r} is not a list of 4 and/or 6")
            kwargs[name] = tuple(int(item) for item in items)
        elif name in ("tproxy_mark", "tproxy_table"):
            kwargs[name] = _parse_int(name, text, base=0)
    return CaptureOptions(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TableRules:
    """The chains pyproxy owns in one table, and every rule it adds there (builtin jumps included)."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything capture installs for one address family."""

    family: int
    tables: tuple[TableRules, ...]
    route_commands: tuple[tuple[str, ...], ...] = field(default=())

    def table(self, name: str) -> TableRules | None:
        for table in self.tables:
            if table.name == name:
                return table
        return None


def _host(address: str, family: int) -> str:
    return f"{address}/{HOST_PREFIX[family]}"


def _dport(port: int) -> str:
    return f"-p tcp -m tcp --dport {port}"


def _inbound_tail(opts: CaptureOptions, chain: str, target: str) -> list[str]:
    if opts.inbound_ports == ALL:
        return [f"-A {chain} -p tcp -j {target}"]
    excluded = set(RESERVED_INBOUND_PORTS) | set(opts.exclude_inbound_ports)
    return [f"-A {chain} {_dport(p)} -j {target}" for p in opts.inbound_ports if p not in excluded]


def _inbound_excludes(opts: CaptureOptions, chain: str) -> list[str]:
    ports = sorted(set(RESERVED_INBOUND_PORTS) | set(opts.exclude_inbound_ports))
    return [f"-A {chain} {_dport(port)} -j RETURN" for port in ports]


def _owner_rules(opts: CaptureOptions, family: int) -> list[str]:
    loopback = _host(LOOPBACK[family], family)
    owners = [f"--uid-owner {opts.proxy_uid}"]
    if opts.proxy_gid is not None:
        owners.append(f"--gid-owner {opts.proxy_gid}")
    rules = []
    for owner in owners:
        # The proxy calling its own pod IP (the app called it, outbound relayed it) leaves on lo
        # and must come back in through the inbound listener, as it would from another pod.
        rules.append(f"-A {OUTPUT} ! -d {loopback} -o lo -m owner {owner} -j {IN_REDIRECT}")
        # Everything else the proxy sends is its own upstream traffic: never recapture it.
        rules.append(f"-A {OUTPUT} -m owner {owner} -j RETURN")
    return rules


def _outbound_rules(opts: CaptureOptions, family: int) -> list[str]:
    source = _host(PASSTHROUGH_SOURCE[family], family)
    loopback = _host(LOOPBACK[family], family)
    rules = [f"-A {OUTPUT} -s {source} -o lo -j RETURN"]
    rules += _owner_rules(opts, family)
    rules.append(f"-A {OUTPUT} -d {loopback} -j RETURN")
    for port in opts.exclude_outbound_ports:
        rules.append(f"-A {OUTPUT} {_dport(port)} -j RETURN")
    for cidr in opts.exclude_outbound_cidrs:
        if ipaddress.ip_network(cidr).version == family:
            rules.append(f"-A {OUTPUT} -d {cidr} -j RETURN")
    if opts.mode == "ebpf":
        return rules  # the connect programs divert the app's connections before any packet
    if opts.outbound_cidrs == ALL:
        destinations = [""]
    else:
        destinations = [
            f"-d {c} " for c in opts.outbound_cidrs if ipaddress.ip_network(c).version == family
        ]
    if opts.outbound_ports == ALL:
        matches = ["-p tcp"]
    else:
        matches = [_dport(p) for p in opts.outbound_ports if p not in opts.exclude_outbound_ports]
    for destination in destinations:
        for match in matches:
            rules.append(f"-A {OUTPUT} {destination}{match} -j {REDIRECT}")
    return rules


def _nat_table(opts: CaptureOptions, family: int) -> TableRules:
    chains = [IN_REDIRECT, OUTPUT, REDIRECT]
    rules = [
        f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.inbound_capture_port}",
        f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {opts.outbound_capture_port}",
    ]
    if opts.mode in ("redirect", "ebpf"):
        chains.insert(0, INBOUND)
        rules.append(f"-A PREROUTING -p tcp -j {INBOUND}")
        rules += _inbound_excludes(opts, INBOUND)
        rules += _inbound_tail(opts, INBOUND, IN_REDIRECT)
    rules.append(f"-A OUTPUT -p tcp -j {OUTPUT}")
    rules += _outbound_rules(opts, family)
    return TableRules("nat", tuple(chains), tuple(rules))


def _mangle_table(opts: CaptureOptions, family: int) -> TableRules:
    mark = f"{opts.tproxy_mark:#x}/0xffffffff"
    loopback = _host(LOOPBACK[family], family)
    rules = [
        f"-A PREROUTING -p tcp -j {INBOUND}",
        f"-A {DIVERT} -j MARK --set-xmark {mark}",
        f"-A {DIVERT} -j ACCEPT",
        f"-A {TPROXY} ! -d {loopback} -p tcp -j TPROXY --on-port {opts.inbound_capture_port}"
        f" --on-ip {ANY_ADDRESS[family]} --tproxy-mark {mark}",
        # Loopback traffic was already steered in nat OUTPUT; TPROXY is for packets from outside.
        f"-A {INBOUND} -i lo -j RETURN",
    ]
    rules += _inbound_excludes(opts, INBOUND)
    # Packets of connections already diverted (or ours) are marked so policy routing keeps them local.
    rules.append(f"-A {INBOUND} -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}")
    rules += _inbound_tail(opts, INBOUND, TPROXY)
    return TableRules("mangle", (DIVERT, INBOUND, TPROXY), tuple(rules))


def route_commands(opts: CaptureOptions, family: int) -> tuple[tuple[str, ...], ...]:
    """The `ip` commands TPROXY needs: marked packets are delivered locally via a private table."""
    if opts.mode != "tproxy":
        return ()
    flag = f"-{family}"
    return (
        (
            "ip",
            flag,
            "rule",
            "add",
            "fwmark",
            f"{opts.tproxy_mark:#x}",
            "lookup",
            str(opts.tproxy_table),
        ),
        (
            "ip",
            flag,
            "route",
            "add",
            "local",
            DEFAULT_ROUTE[family],
            "dev",
            "lo",
            "table",
            str(opts.tproxy_table),
        ),
    )


def build_ruleset(opts: CaptureOptions, family: int = 4) -> RuleSet:
    """The structured rule set for one family: tables, chains, rules and routing commands."""
    if family not in (4, 6):
        raise CaptureOptionError("families", f"{family!r} is not 4 or 6")
    tables = [_nat_table(opts, family)]
    if opts.mode == "tproxy":
        tables.insert(0, _mangle_table(opts, family))
    return RuleSet(family, tuple(tables), route_commands(opts, family))


def render_table(
    table: TableRules, extra_chains: tuple[str, ...] = (), preamble: tuple[str, ...] = ()
) -> str:
    """One `*table ... COMMIT` block for iptables-restore --noflush (declaring a chain flushes it)."""
    lines = [f"*{table.name}"]
    lines += [f":{chain} - [0:0]" for chain in (*table.chains, *extra_chains)]
    lines += preamble
    lines += table.rules
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def build_rules(opts: CaptureOptions, family: int = 4) -> str:
    """iptables-restore --noflush input installing the capture for one family (4 or 6)."""
    ruleset = build_ruleset(opts, family)
    return "".join(render_table(table) for table in ruleset.tables)


def describe(opts: CaptureOptions) -> str:
    """Everything apply would do, for every family, as text a human (or --dry-run) can read."""
    parts = []
    for family in opts.families:
        ruleset = build_ruleset(opts, family)
        parts.append(f"# IPv{family}: {RESTORE_COMMAND[family]} --noflush (mode {opts.mode})\n")
        parts.append(build_rules(opts, family))
        if opts.mode == "ebpf":
            parts.append(
                "# outbound: cgroup connect program (native/capture.bpf.c) on this process's "
                f"cgroup, to port {opts.outbound_capture_port}\n"
            )
        if family == 6:
            parts.append(
                f"# ip -6 addr add {PASSTHROUGH_SOURCE[6]}/128 dev lo nodad  (inbound passthrough source)\n"
            )
        for command in ruleset.route_commands:
            parts.append("# " + " ".join(command) + "\n")
    return "".join(parts)
