"""Where a captured connection was headed: conntrack's SO_ORIGINAL_DST, or the eBPF capture's map."""

from __future__ import annotations

import socket
from collections.abc import Callable

from pyproxy.addresses import Address
from pyproxy.config import ListenerConfig
from pyproxy.io import sockets

Resolver = Callable[[socket.socket], tuple[Address, bool]]


def resolver(config: ListenerConfig) -> Resolver:
    """(original destination, redirected?) for an accepted connection, per the listener's capture."""
    if config.original_dst != "ebpf":
        return sockets.original_destination
    # Opened once per listener; a missing installation fails the start with the reason.
    from pyproxy.native import bpf, ebpf_capture  # type: ignore[attr-defined]  # lazy: libbpf if asked

    originals = ebpf_capture.OriginalDestinations(bpf.own_cgroup())

    def from_ebpf(conn: socket.socket) -> tuple[Address, bool]:
        found = originals.take(conn.getpeername())
        if found is None:  # not diverted by the connect program: reached directly
            host, port = conn.getsockname()[:2]
            return Address(host=host, port=port), False
        return Address(host=found[0], port=found[1]), True

    return from_ebpf
