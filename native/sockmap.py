"""The sockmap fast path (ipc: sockmap): native/sockmap.bpf.c loaded on a pod's cgroup, per pod.

One pin directory per pod cgroup (/sys/fs/bpf/pyproxy/sockmap-cg<cgroup id>) holds the two
programs, the three maps and the cgroup link; removing it (remove(), `pyproxy capture clean
--mode ebpf`, the sidecar's exit) detaches everything. The sidecar registers its app-facing
listener ports; the kernel counts, per port, the connections that took the redirect and those
that did not (a peer outside the pod), and per message what was redirected.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import bpf

OBJECT = "sockmap.bpf.o"
KIND = "sockmap"
PORT_KEY = struct.Struct("=I")
PORT_STATS = struct.Struct("=QQ")  # struct port_stats: redirected, bypassed
COUNTER = struct.Struct("=Q")
STATS = ("messages_redirected", "bytes_redirected", "messages_passed")  # enum order in the C
MAPS = ("pp_socks", "pp_apps", "pp_ports", "pp_stats")
PROGRAMS = ("pp_sockops", "pp_sk_msg")
LINK = "link_sockops"


def unavailable_reason() -> str | None:
    """None when this host can load the sockmap path, else why not."""
    return bpf.unavailable_reason(OBJECT)


def pin_dir(cgroup: Path) -> Path:
    return bpf.pin_dir(KIND, cgroup)


@dataclass
class SockmapPath:
    """The fast path installed on one cgroup; `owned` when this process installed it."""

    cgroup: Path
    directory: Path
    owned: bool
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def install(cls, cgroup: Path, ports: Iterable[int]) -> SockmapPath:
        """Load and attach (or join an installation already pinned for this cgroup)."""
        bpf.prepare(OBJECT, cgroup, "run the sidecar in its pod's cgroup")
        directory = pin_dir(cgroup)
        owned = not (directory / LINK).exists()
        if owned:
            bpf.remove_pins(directory)  # a half-made installation (a crash mid-install)
            bpf.load_and_pin(
                OBJECT,
                directory,
                map_attachments=[("pp_sk_msg", "pp_socks", "BPF_SK_MSG_VERDICT")],
                cgroup_links=[("pp_sockops", "BPF_CGROUP_SOCK_OPS", LINK)],
                cgroup=cgroup,
            )
        path = cls(cgroup, directory, owned)
        try:
            path._fds = {
                name: bpf.open_pinned(directory / name) for name in ("pp_ports", "pp_stats")
            }
            path.register_ports(ports)
        except bpf.BpfError:
            path.close()
            raise
        return path

    def register_ports(self, ports: Iterable[int]) -> None:
        """Connections to these ports are the sidecar's to redirect (counters start at zero)."""
        for port in ports:
            key = PORT_KEY.pack(port)
            if bpf.map_lookup(self._fds["pp_ports"], key, PORT_STATS.size) is None:
                bpf.map_update(self._fds["pp_ports"], key, PORT_STATS.pack(0, 0))

    def port_counts(self) -> dict[int, dict[str, int]]:
        """Per registered port: connections redirected and bypassed (peer outside the pod)."""
        fd = self._fds["pp_ports"]
        out = {}
        for key in bpf.map_keys(fd, PORT_KEY.size):
            value = bpf.map_lookup(fd, key, PORT_STATS.size)
            if value is not None:
                redirected, bypassed = PORT_STATS.unpack(value)
                out[PORT_KEY.unpack(key)[0]] = {
                    "connections_redirected": redirected,
                    "connections_bypassed": bypassed,
                }
        return out

    def message_counts(self) -> dict[str, int]:
        """Messages and bytes redirected, and messages passed to TCP, summed over CPUs."""
        cpus = bpf.possible_cpus()
        out = {}
        for index, name in enumerate(STATS):
            value = bpf.map_lookup(self._fds["pp_stats"], PORT_KEY.pack(index), 8 * cpus) or b""
            out[name] = sum(v for (v,) in COUNTER.iter_unpack(value))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def remove(self) -> None:
        """Close, and if this process installed it, unpin everything (the programs detach)."""
        self.close()
        if self.owned:
            bpf.remove_pins(self.directory)
