"""Per-worker overload limits: how many connections and pending requests one worker takes on.

Beyond a limit the worker turns work away at once instead of queueing it: a
new connection is closed (with a reset, so the client does not wait), a new
request is answered 503 (gRPC: UNAVAILABLE). Both are counted in the
listener's `refused` counters. The connection count is the worker's own
set of live connections; a request is pending from its head until its
exchange finishes. Requests the HTTP/1 express lanes carry whole are bounded
by the connection limit instead (one in flight per connection).
"""

from __future__ import annotations

import logging
import resource

from pyproxy.config import ProxyConfig

log = logging.getLogger("pyproxy.admission")

# A downstream and an upstream socket (splice pipes are pooled, not per connection).
FDS_PER_CONNECTION = 2
FD_SPARE = 1024  # listeners, pooled pipes and upstream connections, admin, logs


class Admission:
    """One per worker, shared by its listeners; limits follow config reloads."""

    __slots__ = (
        "connections",
        "max_connections",
        "max_pending_requests",
        "pending",
        "high_water",
    )

    def __init__(self, connections: set, config: ProxyConfig) -> None:
        self.connections = connections  # the worker's live connections (one entry each)
        self.pending = 0
        self.high_water = 0  # most connections seen since the worker last returned memory
        self.apply(config)

    def apply(self, config: ProxyConfig) -> None:
        self.max_connections = config.max_connections
        self.max_pending_requests = config.max_pending_requests
        raise_fd_limit(config.max_connections)

    def connection_allowed(self) -> bool:
        count = len(self.connections)
        if count > self.high_water:
            self.high_water = count
        return count < self.max_connections

    def admit_request(self) -> bool:
        """Count one more pending request, or say no (the caller answers 503)."""
        if self.pending >= self.max_pending_requests:
            return False
        self.pending += 1
        return True

    def request_finished(self) -> None:
        self.pending -= 1


def raise_fd_limit(max_connections: int) -> None:
    """Make room for every allowed connection's sockets: soft limit up, hard limit too if permitted."""
    wanted = FDS_PER_CONNECTION * max_connections + FD_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        return
    except (ValueError, OSError):  # above the hard limit without CAP_SYS_RESOURCE
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.warning(
        "open-file limit %d is below the %d that max_connections %d needs; accepts may fail",
        hard, wanted, max_connections,
    )  # fmt: skip
