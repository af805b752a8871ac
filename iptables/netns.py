"""Build throwaway "pods" (network namespaces joined by veth pairs) and run processes inside them as any uid."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyproxy.native.bpf import cgroup_pin_dirs, mount_point, remove_pins

# Every namespace this process creates starts with this prefix, so parallel runs never clash and
# a crashed run's leftovers can be recognised (the pid in the name is no longer alive).
NAME_PREFIX = "pp"
RUN_ID = f"{NAME_PREFIX}{os.getpid()}"
_counter = itertools.count()

IPV4_SUBNET = "10.88.0.0/24"
IPV6_SUBNET = "fd00:88::/64"
IFA_F_NODAD = 0x02
NETNS_DIR = "/run/netns"
# Joins the cgroup whose cgroup.procs is $0, then becomes the rest of the command line.
_JOIN_CGROUP = 'echo $$ > "$0" && exec "$@"'


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up."""


def missing_capabilities() -> list[str]:
    """What this host lacks to build pods and apply real rules (empty when everything is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (euid 0)")
    for tool in (
        "ip",
        "setpriv",
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
    ):
        if shutil.which(tool) is None:
            missing.append(f"{tool} on PATH")
    if missing:
        return missing
    try:
        with namespace("probe") as name:
            result = subprocess.run(
                ["ip", "netns", "exec", name, "iptables-save"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if result.returncode != 0:
                missing.append(f"iptables in a namespace ({result.stderr.strip()})")
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot build pods"
        missing.append(f"network namespaces ({exc})")
    return missing


def unique_name(role: str) -> str:
    """A namespace name unique to this process and call, e.g. pp4242-3-a."""
    return f"{RUN_ID}-{next(_counter)}-{role}"


def _netns_module() -> Any:
    from pyroute2 import netns

    return netns


def _ns_ipr(name: str) -> Any:
    from pyroute2 import NetNS

    return NetNS(name)


def _set_lo_up(name: str) -> None:
    with _ns_ipr(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def create_namespace(name: str) -> None:
    """Create a namespace with loopback up."""
    _netns_module().create(name)
    _set_lo_up(name)


def remove_namespace(name: str) -> None:
    """Delete a namespace; a missing one is not an error."""
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        _netns_module().remove(name)


def list_namespaces() -> list[str]:
    """Names of all named network namespaces."""
    return sorted(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else []


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by runs whose process is gone; return their names."""
    removed = []
    for name in list_namespaces():
        head = name.split("-", 1)[0]
        if not head.startswith(NAME_PREFIX) or not head[len(NAME_PREFIX) :].isdigit():
            continue
        pid = int(head[len(NAME_PREFIX) :])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        remove_namespace(name)
        removed.append(name)
    return removed


@contextlib.contextmanager
def namespace(role: str = "ns") -> Iterator[str]:
    """A fresh namespace (lo up) that is deleted on exit, whatever happened inside."""
    name = unique_name(role)
    try:
        create_namespace(name)
        yield name
    finally:
        remove_namespace(name)


def _add_veth(ns: str, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    # Created inside the pod namespace with the peer sent straight to its namespace: no interface
    # ever appears in the host namespace, so nothing can route out of the test.
    with _ns_ipr(ns) as ipr:
        ipr.link(
            "add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": peer_ns}
        )


def _up(ns: str, ifname: str, master: str | None = None) -> None:
    with _ns_ipr(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        if master is not None:
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=master)[0])
        ipr.link("set", index=index, state="up")


def _add_address(ns: str, ifname: str, address: str, prefixlen: int) -> None:
    with _ns_ipr(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        # No duplicate address detection: an IPv6 address is usable at once, not after ~2 s.
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)


@dataclass
class Pod:
    """One network namespace with an eth0 and addresses; runs processes inside, as any uid."""

    role: str
    netns: str
    ipv4: str | None = None
    ipv6: str | None = None
    cgroup: Path | None = None  # the pod's cgroup v2: every process it starts runs in it
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def address(self, family: int) -> str:
        value = self.ipv4 if family == 4 else self.ipv6
        if value is None:
            raise NetnsError(f"pod {self.role} has no IPv{family} address")
        return value

    def command(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        caps: Sequence[str] = (),
    ) -> list[str]:
        """argv wrapped to run inside this pod, as uid/gid if given, keeping the named capabilities."""
        wrapped = ["ip", "netns", "exec", self.netns]
        if self.cgroup is not None:
            # A pod with a cgroup runs eBPF programs: nsenter joins only the network namespace,
            # so its processes see the host's /sys/fs/cgroup and /sys/fs/bpf (ip netns exec
            # remounts /sys), as a sidecar is given them in a cluster.
            netns = f"--net={os.path.join(NETNS_DIR, self.netns)}"
            wrapped = ["sh", "-c", _JOIN_CGROUP, str(self.cgroup / "cgroup.procs")]
            wrapped += ["nsenter", netns]
        if uid is not None:
            gid = uid if gid is None else gid
            wrapped += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
            if caps:
                # Ambient capabilities survive the uid change and the exec (e.g. net_admin for
                # IP_TRANSPARENT under TPROXY, as a real sidecar is granted).
                spec = ",".join(f"+{c}" for c in caps)
                wrapped += [f"--inh-caps={spec}", f"--ambient-caps={spec}"]
            wrapped.append("--")
        return wrapped + list(argv)

    def popen(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        caps: Sequence[str] = (),
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start a process inside the pod; it is killed when the pod is torn down."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv, uid, gid, caps), **kwargs)
        self._processes.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = 30.0,
        check: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the pod to completion (bounded by timeout), capturing text output."""
        kwargs.setdefault("capture_output", True)
        result = subprocess.run(
            self.command(argv, uid, gid), text=True, timeout=timeout, check=False, **kwargs
        )
        if check and result.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv)} in {self.netns} exited {result.returncode}: {(result.stderr or '').strip()}"
            )
        return result

    def stop_processes(self, grace: float = 3.0) -> None:
        """Terminate every process this pod started (their own process groups), then kill stragglers."""
        for proc in self._processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._processes:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._processes.clear()


def create_cgroup(name: str) -> Path:
    """A cgroup v2 (under /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    root = mount_point("cgroup2")
    if root is None:
        raise NetnsError("cgroup v2 is not mounted")
    path = root / name
    path.mkdir()
    return path


def remove_cgroup(path: Path, timeout: float = 5.0) -> list[Path]:
    """Kill whatever still runs in the cgroup, unpin pyproxy's eBPF objects for it, remove it.

    Returns the pin directories that were still there (a test asserting a clean exit checks it);
    a missing cgroup is not an error.
    """
    if not path.exists():
        return []
    leftovers = cgroup_pin_dirs(path)
    for directory in leftovers:
        remove_pins(directory)
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return leftovers
        except FileNotFoundError:
            return leftovers
        except OSError:  # EBUSY until the killed processes are reaped
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _host_addresses(subnet: str, count: int) -> list[str]:
    network = ipaddress.ip_network(subnet)
    hosts = network.hosts()
    next(hosts)  # .1 / ::1 left free, as for a gateway
    return [str(next(hosts)) for _ in range(count)]


@contextlib.contextmanager
def pods(
    roles: Sequence[str] = ("a", "b"),
    *,
    bridge: bool = True,
    cgroups: bool = False,
    ipv4_subnet: str | None = IPV4_SUBNET,
    ipv6_subnet: str | None = IPV6_SUBNET,
) -> Iterator[dict[str, Pod]]:
    """Pods joined through a bridge namespace (or, for two pods, one point-to-point veth pair).

    Every namespace, and so every link and address, is deleted on exit, even when setup failed
    half way; processes started with Pod.popen are stopped first. With cgroups, each pod also
    gets its own cgroup v2, removed (after killing what is left in it) on exit.
    """
    if not bridge and len(roles) != 2:
        raise ValueError("point-to-point needs exactly two pods")
    v4 = _host_addresses(ipv4_subnet, len(roles)) if ipv4_subnet else [None] * len(roles)
    v6 = _host_addresses(ipv6_subnet, len(roles)) if ipv6_subnet else [None] * len(roles)
    created: list[str] = []
    made: dict[str, Pod] = {}
    try:
        hub = unique_name("br") if bridge else ""
        if bridge:
            create_namespace(hub)
            created.append(hub)
            with _ns_ipr(hub) as ipr:
                ipr.link("add", ifname="br0", kind="bridge")
            _up(hub, "br0")
        for index, role in enumerate(roles):
            pod = Pod(role, unique_name(role), v4[index], v6[index])
            create_namespace(pod.netns)
            created.append(pod.netns)
            made[role] = pod
            if cgroups:
                pod.cgroup = create_cgroup(pod.netns)
        pod_list = list(made.values())
        if bridge:
            for index, pod in enumerate(pod_list):
                port = f"veth{index}"
                _add_veth(pod.netns, "eth0", hub, port)
                _up(hub, port, master="br0")
        else:
            _add_veth(pod_list[0].netns, "eth0", pod_list[1].netns, "eth0")
        v4_prefix = ipaddress.ip_network(ipv4_subnet).prefixlen if ipv4_subnet else 0
        v6_prefix = ipaddress.ip_network(ipv6_subnet).prefixlen if ipv6_subnet else 0
        for pod in pod_list:
            if pod.ipv4:
                _add_address(pod.netns, "eth0", pod.ipv4, v4_prefix)
            if pod.ipv6:
                _add_address(pod.netns, "eth0", pod.ipv6, v6_prefix)
            _up(pod.netns, "eth0")
        yield made
    finally:
        for pod in made.values():
            with contextlib.suppress(Exception):
                pod.stop_processes()
            if pod.cgroup is not None:
                with contextlib.suppress(Exception):
                    remove_cgroup(pod.cgroup)
        for name in reversed(created):
            with contextlib.suppress(Exception):
                remove_namespace(name)
