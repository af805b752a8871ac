"""Outbound capture by eBPF (capture: ebpf): native/capture.bpf.c on a pod's cgroup, per pod.

`pyproxy capture apply --mode ebpf` installs it on the cgroup it runs in (the pod's), pinned
under /sys/fs/bpf/pyproxy/capture-cg<cgroup id>; clean removes the pins (the links detach, the
maps and programs go). The sidecar's outbound listener reads each connection's original
destination from the pinned pp_cap_orig map, keyed by its peer's address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import bpf

OBJECT = "capture.bpf.o"
KIND = "capture"
ORIGINALS = "pp_cap_orig"
# (program, attach type, link pin) per address family; sockops files the original destination.
FAMILY_LINKS = {
    4: ("pp_connect4", "BPF_CGROUP_INET4_CONNECT", "link_connect4"),
    6: ("pp_connect6", "BPF_CGROUP_INET6_CONNECT", "link_connect6"),
}
SOCKOPS_LINK = ("pp_cap_sockops", "BPF_CGROUP_SOCK_OPS", "link_sockops")
ENDPOINT = struct.Struct("=16sI")  # struct endpoint: address (network order), port (host order)
CONFIG = struct.Struct("=5I")  # struct capture_config
CIDR = struct.Struct("=I16s")  # struct cidr_key
U32 = struct.Struct("=I")
PORT_CAPTURE, PORT_EXCLUDE = 1, 2


@dataclass(frozen=True)
class Selection:
    """What to capture: the outbound part of the iptables capture options."""

    outbound_port: int
    proxy_uid: int
    proxy_gid: int | None
    families: tuple[int, ...]
    ports: tuple[int, ...] | None  # None: every port
    exclude_ports: tuple[int, ...]
    exclude_cidrs: tuple[str, ...]


def pin_dir(cgroup: Path) -> Path:
    return bpf.pin_dir(KIND, cgroup)


def _mapped(address: str) -> bytes:
    """16 bytes, IPv4 as IPv4-mapped IPv6: the programs' one address format."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{ip}").packed
    return ip.packed


def apply(cgroup: Path, selection: Selection) -> Path:
    """Install (replacing an earlier installation on this cgroup); returns the pin directory."""
    bpf.prepare(OBJECT, cgroup, "run `pyproxy capture apply --mode ebpf` in the pod's cgroup")
    directory = pin_dir(cgroup)
    links = [FAMILY_LINKS[f] for f in selection.families] + [SOCKOPS_LINK]
    if sorted(p.name for p in directory.glob("link_*")) == sorted(link for *_, link in links):
        # Re-applied with the same families: change the selection in place, keeping the
        # pp_cap_orig map a running sidecar has open.
        _configure(directory, selection)
        return directory
    bpf.remove_pins(directory)
    # The maps are filled before the connect hooks are attached: no connect sees them empty.
    bpf.load_and_pin(OBJECT, directory)
    try:
        _configure(directory, selection)
        _attach(directory, cgroup, links)
        # The sidecar (its uid, CAP_BPF) reads and deletes original destinations.
        os.chown(directory / ORIGINALS, selection.proxy_uid, -1)
    except BaseException:
        bpf.remove_pins(directory)
        raise
    return directory


def _configure(directory: Path, selection: Selection) -> None:
    fds = {name: bpf.open_pinned(directory / name) for name in ("pp_cap_config", "pp_cap_ports")}
    fds["pp_cap_exclude"] = bpf.open_pinned(directory / "pp_cap_exclude")
    try:
        for name in ("pp_cap_ports", "pp_cap_exclude"):  # a re-apply replaces the lists
            for key in bpf.map_keys(fds[name], U32.size if name == "pp_cap_ports" else CIDR.size):
                bpf.map_delete(fds[name], key)
        gid = selection.proxy_gid
        config = CONFIG.pack(
            selection.proxy_uid,
            gid or 0,
            gid is not None,
            selection.outbound_port,
            selection.ports is None,
        )
        bpf.map_update(fds["pp_cap_config"], U32.pack(0), config)
        for port in selection.ports or ():
            bpf.map_update(fds["pp_cap_ports"], U32.pack(port), U32.pack(PORT_CAPTURE))
        for port in selection.exclude_ports:
            bpf.map_update(fds["pp_cap_ports"], U32.pack(port), U32.pack(PORT_EXCLUDE))
        for cidr in selection.exclude_cidrs:
            net = ipaddress.ip_network(cidr)
            bits = net.prefixlen + (96 if net.version == 4 else 0)
            key = CIDR.pack(bits, _mapped(str(net.network_address)))
            bpf.map_update(fds["pp_cap_exclude"], key, U32.pack(1))
    finally:
        for fd in fds.values():
            os.close(fd)


def _attach(directory: Path, cgroup: Path, links: Iterable[tuple[str, str, str]]) -> None:
    for program, kind, link_name in links:
        prog_fd = bpf.open_pinned(directory / program)
        try:
            link_fd = bpf.link_to_cgroup(prog_fd, cgroup, kind)
        finally:
            os.close(prog_fd)
        try:
            bpf.pin(link_fd, directory / link_name)
        finally:
            os.close(link_fd)


def clean(cgroup: Path) -> list[str]:
    """Remove this cgroup's installation; what was unpinned (empty when there was none)."""
    directory = pin_dir(cgroup)
    return [f"unpinned {directory}/{name}" for name in bpf.remove_pins(directory)]


def show(cgroup: Path) -> str:
    """Pins, and the programs attached to the cgroup (bpftool, when installed)."""
    directory = pin_dir(cgroup)
    if not directory.exists():
        return f"# eBPF capture: none on cgroup {cgroup}\n"
    out = [f"# eBPF capture on cgroup {cgroup}, pinned at {directory}\n"]
    out += [f"#   {p.name}\n" for p in sorted(directory.iterdir())]
    with contextlib.suppress(OSError):
        attached = subprocess.run(
            ["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True, timeout=10
        )
        out += [f"# {line}\n" for line in attached.stdout.splitlines()]
    return "".join(out)


class OriginalDestinations:
    """The sidecar's view of pp_cap_orig: where each captured app connection was headed."""

    def __init__(self, cgroup: Path) -> None:
        self._fd = bpf.open_pinned(pin_dir(cgroup) / ORIGINALS)

    def take(self, peer: tuple) -> tuple[str, int] | None:
        """(host, port) the app at `peer` (the accepted socket's peer address) connected to."""
        key = ENDPOINT.pack(_mapped(peer[0]), peer[1])
        value = bpf.map_lookup(self._fd, key, ENDPOINT.size)
        if value is None:
            return None
        bpf.map_delete(self._fd, key)  # one accept per connection
        packed, port = ENDPOINT.unpack(value)
        ip = ipaddress.IPv6Address(packed)
        host = str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)
        return host, port

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
