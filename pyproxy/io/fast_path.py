"""The app-facing kernel fast path (ipc: sockmap): installed once per sidecar, reported per listener.

The sidecar installs native/sockmap.bpf.c on its own cgroup v2 (the pod's, when app and sidecar
share it) before its workers start, registers the listen ports of its `ipc: sockmap` listeners,
and removes the installation on exit. When the kernel, privileges or toolchain are missing it
says why and those listeners carry the app's bytes over plain loopback TCP; nothing else changes
(the stage clock's `ipc` is still the app-facing socket's calls either way).
"""

from __future__ import annotations

import logging
from typing import Any

from pyproxy.config import ListenerConfig, ProxyConfig

log = logging.getLogger("pyproxy.fast_path")


def _sockmap_listeners(config: ProxyConfig) -> list[ListenerConfig]:
    return [lst for lst in config.listeners if lst.ipc == "sockmap"]


class IpcFastPath:
    """The sockmap installation (or why there is none) and its per-listener counts."""

    def __init__(self, config: ProxyConfig) -> None:
        self._ports = {
            lst.name: tuple(a.port for a in lst.addresses) for lst in _sockmap_listeners(config)
        }
        self.path: Any = None  # pyproxy.native.sockmap.SockmapPath once installed
        self.reason: str | None = None

    @classmethod
    def start(cls, config: ProxyConfig) -> IpcFastPath:
        fast = cls(config)
        if fast._ports:
            fast._install()
        return fast

    def _install(self) -> None:
        from pyproxy.native import bpf, sockmap  # type: ignore[attr-defined]  # lazy: libbpf if asked

        ports = sorted({port for ports in self._ports.values() for port in ports})
        try:
            self.path = sockmap.SockmapPath.install(bpf.own_cgroup(), ports)
        except (bpf.BpfError, OSError) as exc:
            self.reason = str(exc)
            log.warning(
                "ipc sockmap unavailable, listeners %s carry the app's bytes over loopback TCP: %s",
                ", ".join(self._ports),
                self.reason,
            )
            return
        log.info(
            "ipc sockmap: programs on cgroup %s, pinned at %s (%s)",
            self.path.cgroup,
            self.path.directory,
            "installed" if self.path.owned else "shared with the sidecar that installed it",
        )

    def describe(self, listener: ListenerConfig) -> dict:
        """The effective IPC path of one listener (what /server_info reports)."""
        if listener.name not in self._ports:
            if listener.ipc == "sockmap":
                return {"path": "tcp", "sockmap_unavailable": "added by a reload: needs a restart"}
            return {"path": listener.ipc}
        if self.path is None:
            return {"path": "tcp", "sockmap_unavailable": self.reason}
        counts = self._redirected(listener.name)
        return {"path": "sockmap", "pin_dir": str(self.path.directory), **counts}

    def connections(self, listener: ListenerConfig, total: int) -> dict[str, int]:
        """Accepted connections by the path they took (sockmap, or the listener's plain ipc)."""
        if listener.name not in self._ports or self.path is None:
            return {"tcp" if listener.ipc == "sockmap" else listener.ipc: total}
        redirected = self._redirected(listener.name)["connections_redirected"]
        return {"sockmap": redirected, "tcp": max(0, total - redirected)}

    def _redirected(self, name: str) -> dict[str, int]:
        counts = self.path.port_counts()
        out = {"connections_redirected": 0, "connections_bypassed": 0}
        for port in self._ports[name]:
            for key, value in counts.get(port, {}).items():
                out[key] += value
        return out

    def messages(self) -> dict[str, int] | None:
        """Messages and bytes the kernel redirected (all sockmap listeners), None when off."""
        return None if self.path is None else self.path.message_counts()

    def stop(self) -> None:
        if self.path is not None:
            self.path.remove()
            self.path = None
