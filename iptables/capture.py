"""Install, remove and show the capture in the current network namespace, atomically per table with rollback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyproxy.iptables.rules import (
    ALL,
    CHAIN_PREFIX,
    DEFAULT_ROUTE,
    PASSTHROUGH_SOURCE,
    RESTORE_COMMAND,
    SAVE_COMMAND,
    TABLE_MARKER,
    CaptureOptions,
    TableRules,
    build_ruleset,
    render_table,
)

BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
# Tag on the ::6 address apply adds to lo (IFA_PROTO), so clean removes it only if apply added it.
ADDRESS_PROTO = 0x50
COMMAND_TIMEOUT = 30.0


class CaptureError(RuntimeError):
    """apply/clean/show could not do its job; the message says what and why."""


@dataclass
class TableState:
    """One table as iptables-save printed it."""

    name: str
    # chain -> policy ("-" for user chains), in save order
    chains: dict[str, str] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    text: str = ""

    def ours(self) -> list[str]:
        return [c for c in self.chains if c.startswith(CHAIN_PREFIX)]

    def jumps(self) -> list[str]:
        """Rules in chains that are not ours that jump to one of ours: the hooks apply added."""
        found = []
        for rule in self.rules:
            parts = rule.split()
            if len(parts) < 2 or parts[1].startswith(CHAIN_PREFIX):
                continue
            for flag in ("-j", "-g"):
                if flag in parts:
                    target = parts[parts.index(flag) + 1]
                    if target.startswith(CHAIN_PREFIX):
                        found.append(rule)
        return found

    def pristine_without_ours(self) -> bool:
        """True when, ours removed, the table holds only builtin chains with ACCEPT and no rules."""
        jumps = set(self.jumps())
        for chain, policy in self.chains.items():
            if chain.startswith(CHAIN_PREFIX):
                continue
            if chain not in BUILTIN_CHAINS or policy != "ACCEPT":
                return False
        for rule in self.rules:
            if rule in jumps or rule.split()[1].startswith(CHAIN_PREFIX):
                continue
            return False
        return True


def parse_save(text: str) -> dict[str, TableState]:
    """Parse iptables-save output into tables (comments and counters dropped)."""
    tables: dict[str, TableState] = {}
    current: TableState | None = None
    block: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = TableState(line[1:].strip())
            block = [line]
            continue
        if current is None:
            continue
        block.append(line)
        if line == "COMMIT":
            current.text = "\n".join(block) + "\n"
            tables[current.name] = current
            current = None
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            current.chains[name] = policy
        elif line.startswith("-A "):
            current.rules.append(line)
    return tables


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CaptureError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"{' '.join(argv)}: timed out after {COMMAND_TIMEOUT:.0f}s") from None


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise CaptureError(f"{what} failed (exit {result.returncode}): {detail}")
    return result.stdout


def preflight(families: Sequence[int], need_ip: bool) -> None:
    """Refuse early, before any rule is touched, when the tools or the privilege are missing."""
    commands = [SAVE_COMMAND[f] for f in families] + [RESTORE_COMMAND[f] for f in families]
    if need_ip:
        commands.append("ip")
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise CaptureError(f"required command(s) not found on PATH: {', '.join(missing)}")


def save(family: int) -> dict[str, TableState]:
    """The current rules of one family, as iptables-save shows them."""
    out = _check(_run([SAVE_COMMAND[family]]), SAVE_COMMAND[family])
    return parse_save(out)


def _restore(family: int, text: str, noflush: bool = True) -> None:
    argv = [RESTORE_COMMAND[family]] + (["--noflush"] if noflush else [])
    _check(_run(argv, stdin=text), f"{argv[0]}{' --noflush' if noflush else ''}")


def _replace_block(table: str, current: TableState | None, new: TableRules | None) -> str:
    """A --noflush transaction for one table: drop our old hooks and chains, install the new set.

    Declaring a chain flushes it, so chains kept across applies are rewritten in place and
    apply stays idempotent; chains no longer wanted are flushed, then deleted.
    """
    old_chains = current.ours() if current else []
    keep_marker = TABLE_MARKER in old_chains or current is None
    preamble = [f"-D{rule[2:]}" for rule in (current.jumps() if current else [])]
    new_chains = set(new.chains) if new else set()
    if keep_marker and new is not None:
        new_chains.add(TABLE_MARKER)
    obsolete = [c for c in old_chains if c not in new_chains]
    preamble += [f"-F {c}" for c in obsolete]
    preamble += [f"-X {c}" for c in obsolete]
    rules = new or TableRules(table, (), ())
    extra = (TABLE_MARKER,) if keep_marker and new is not None else ()
    return render_table(rules, extra_chains=extra, preamble=tuple(preamble))


@dataclass
class _Undo:
    """What apply changed so far, to put back if a later step fails."""

    snapshots: dict[int, dict[str, TableState]] = field(default_factory=dict)
    touched: dict[int, set[str]] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    address_added: bool = False

    def rollback(self) -> list[str]:
        problems = []
        for argv in reversed(self.commands):
            result = _run(argv)
            if result.returncode != 0:
                problems.append(f"{' '.join(argv)}: {result.stderr.strip()}")
        if self.address_added:
            try:
                _remove_passthrough_address(only_tagged=True)
            except Exception as exc:  # noqa: BLE001 - keep rolling back the rest
                problems.append(f"remove ::6: {exc}")
        for family, tables in self.touched.items():
            snapshot = self.snapshots[family]
            # A full (flushing) restore of the saved table text puts it back exactly; a table
            # that did not exist is restored empty, which on nf_tables removes it again.
            text = "".join(
                snapshot[t].text if t in snapshot else f"*{t}\nCOMMIT\n" for t in sorted(tables)
            )
            try:
                _restore(family, text, noflush=False)
            except CaptureError as exc:
                problems.append(str(exc))
        return problems


def _has_rule(family: int, mark: int, table: int) -> bool:
    out = _check(_run(["ip", f"-{family}", "rule", "show"]), "ip rule show")
    want = f"fwmark {mark:#x} lookup {table}"
    return any(want in line for line in out.splitlines())


def _has_route(family: int, table: int) -> bool:
    result = _run(["ip", f"-{family}", "route", "show", "table", str(table)])
    if result.returncode != 0:  # an unused table does not exist yet
        return False
    return any(line.startswith("local default dev lo") for line in result.stdout.splitlines())


def _passthrough_address_state() -> tuple[bool, bool]:
    """(present, tagged-by-us) for ::6/128 on lo."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        for addr in ipr.get_addr(family=10, index=index):
            if addr.get_attr("IFA_ADDRESS") == PASSTHROUGH_SOURCE[6] and addr["prefixlen"] == 128:
                return True, addr.get_attr("IFA_PROTO") == ADDRESS_PROTO
    return False, False


def _add_passthrough_address() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        # IFA_F_NODAD: usable at once; IFA_PROTO marks it as ours for clean.
        ipr.addr(
            "add",
            index=index,
            address=PASSTHROUGH_SOURCE[6],
            prefixlen=128,
            flags=0x02,
            IFA_PROTO=ADDRESS_PROTO,
        )


def _remove_passthrough_address(only_tagged: bool) -> bool:
    present, tagged = _passthrough_address_state()
    if not present or (only_tagged and not tagged):
        return False
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        ipr.addr("del", index=index, address=PASSTHROUGH_SOURCE[6], prefixlen=128)
    return True


def _routing_clean_commands(opts: CaptureOptions, family: int) -> list[list[str]]:
    commands = []
    mark, table = f"{opts.tproxy_mark:#x}", str(opts.tproxy_table)
    if _has_rule(family, opts.tproxy_mark, opts.tproxy_table):
        commands.append(["ip", f"-{family}", "rule", "del", "fwmark", mark, "lookup", table])
    if _has_route(family, opts.tproxy_table):
        commands.append(
            [
                "ip",
                f"-{family}",
                "route",
                "del",
                "local",
                DEFAULT_ROUTE[family],
                "dev",
                "lo",
                "table",
                table,
            ]
        )
    return commands


def _remove_ours(family: int, tables: dict[str, TableState]) -> None:
    """Remove our chains and hooks from these tables, and a table apply created once it is empty."""
    full, partial = [], []
    for name, table in sorted(tables.items()):
        if TABLE_MARKER in table.chains and table.pristine_without_ours():
            # apply created this table; an empty flushing restore removes it again.
            full.append(f"*{name}\nCOMMIT\n")
        else:
            partial.append(_replace_block(name, table, None))
    if partial:
        _restore(family, "".join(partial))
    if full:
        _restore(family, "".join(full), noflush=False)


def _ebpf_selection(opts: CaptureOptions) -> Any:
    from pyproxy.native.ebpf_capture import Selection

    return Selection(
        outbound_port=opts.outbound_capture_port,
        proxy_uid=opts.proxy_uid,
        proxy_gid=opts.proxy_gid,
        families=opts.families,
        ports=None if opts.outbound_ports == ALL else tuple(opts.outbound_ports),
        exclude_ports=opts.exclude_outbound_ports,
        exclude_cidrs=opts.exclude_outbound_cidrs,
    )


def _ebpf_outbound(opts: CaptureOptions | None) -> list[str]:
    """Install (opts in ebpf mode) or remove (otherwise) the eBPF outbound capture of this cgroup."""
    from pyproxy.native import bpf, ebpf_capture

    try:
        cgroup = bpf.own_cgroup()
        if opts is not None and opts.mode == "ebpf":
            where = ebpf_capture.apply(cgroup, _ebpf_selection(opts))
            return [f"eBPF outbound capture on cgroup {cgroup}, pinned at {where}"]
        return ebpf_capture.clean(cgroup)
    except (bpf.BpfError, OSError) as exc:
        if opts is None or opts.mode != "ebpf":
            return []  # nothing of ours can be there without a usable eBPF set-up
        raise CaptureError(f"eBPF capture: {exc}") from exc


def apply(opts: CaptureOptions) -> None:
    """Install the capture for every family in opts, replacing any earlier pyproxy capture.

    Each table changes in one iptables-restore transaction; if any step fails, everything done
    so far is undone and CaptureError says what failed.
    """
    preflight(opts.families, need_ip=True)
    undo = _Undo()
    for family in opts.families:
        undo.snapshots[family] = save(family)
    try:
        for family in opts.families:
            current = undo.snapshots[family]
            ruleset = build_ruleset(opts, family)
            wanted = {t.name: t for t in ruleset.tables}
            stale = {n: t for n, t in current.items() if t.ours() and n not in wanted}
            undo.touched[family] = set(wanted) | set(stale)
            _restore(
                family,
                "".join(_replace_block(n, current.get(n), t) for n, t in sorted(wanted.items())),
            )
            _remove_ours(family, stale)
            if family == 6:
                present, _ = _passthrough_address_state()
                if not present:
                    _add_passthrough_address()
                    undo.address_added = True
            if opts.mode == "tproxy":
                argv_rule, argv_route = (list(c) for c in ruleset.route_commands)
                if not _has_rule(family, opts.tproxy_mark, opts.tproxy_table):
                    _check(_run(argv_rule), " ".join(argv_rule))
                    undo.commands.append([*argv_rule[:3], "del", *argv_rule[4:]])
                if not _has_route(family, opts.tproxy_table):
                    _check(_run(argv_route), " ".join(argv_route))
                    undo.commands.append([*argv_route[:3], "del", *argv_route[4:]])
            else:
                # Switching from TPROXY to REDIRECT: the old policy routing is no longer ours to keep.
                for argv in _routing_clean_commands(opts, family):
                    _check(_run(argv), " ".join(argv))
        _ebpf_outbound(opts)  # last: a failure rolls the iptables part back too
    except Exception as exc:
        problems = undo.rollback()
        note = "; rollback problems: " + "; ".join(problems) if problems else "; rolled back"
        raise CaptureError(f"apply failed: {exc}{note}") from exc


def clean(opts: CaptureOptions) -> list[str]:
    """Remove exactly what apply installed (our chains, their hooks, our routing); return a summary."""
    preflight(opts.families, need_ip=True)
    done = []
    for family in opts.families:
        ours = {n: t for n, t in save(family).items() if t.ours()}
        _remove_ours(family, ours)
        done += [f"IPv{family} {n}: removed {', '.join(t.ours())}" for n, t in sorted(ours.items())]
        for argv in _routing_clean_commands(opts, family):
            _check(_run(argv), " ".join(argv))
            done.append(" ".join(argv))
        if family == 6 and _remove_passthrough_address(only_tagged=True):
            done.append(f"ip -6 addr del {PASSTHROUGH_SOURCE[6]}/128 dev lo")
    return done + _ebpf_outbound(None)


def show(opts: CaptureOptions) -> str:
    """The pyproxy part of the current rules and routing, as installed."""
    preflight(opts.families, need_ip=True)
    out = []
    for family in opts.families:
        out.append(f"# IPv{family}\n")
        for name, table in sorted(save(family).items()):
            ours = table.ours()
            if not ours:
                continue
            out.append(f"*{name}\n")
            out += [f":{c} - [0:0]\n" for c in ours]
            jumps = set(table.jumps())
            out += [
                r + "\n" for r in table.rules if r in jumps or r.split()[1].startswith(CHAIN_PREFIX)
            ]
            out.append("COMMIT\n")
        if _has_rule(family, opts.tproxy_mark, opts.tproxy_table):
            out.append(
                f"# ip -{family} rule: fwmark {opts.tproxy_mark:#x} lookup {opts.tproxy_table}\n"
            )
        if _has_route(family, opts.tproxy_table):
            out.append(f"# ip -{family} route: local default dev lo table {opts.tproxy_table}\n")
        if family == 6:
            present, tagged = _passthrough_address_state()
            if present:
                owner = "added by pyproxy" if tagged else "not added by pyproxy"
                out.append(f"# lo has {PASSTHROUGH_SOURCE[6]}/128 ({owner})\n")
    return "".join(out) + _ebpf_show()


def _ebpf_show() -> str:
    from pyproxy.native import bpf, ebpf_capture

    try:
        return ebpf_capture.show(bpf.own_cgroup())
    except (bpf.BpfError, OSError) as exc:
        return f"# eBPF capture: cannot look ({exc})\n"
