"""Routing for HTTP mode: authority + path prefix → a cluster of endpoints (round robin), with timeouts.

The route timeout rule lives here (``route_timeouts``), once:

* A plain HTTP exchange must be answered in full within the route ``timeout``
  (default 15 s), counted from the moment its whole request has arrived
  (Envoy's rule). Streams are never cut while they move: while a request body
  is still arriving, and for a response of no set length (chunked,
  close-delimited, an HTTP/2 response without content-length), the timeout
  bounds silence instead: every chunk restarts it. An upload that goes silent
  gets 408, a response that never starts 504, a stalled stream a reset.
* A gRPC call is a stream that may rightly live long (a health ``Watch``, a
  subscription); the caller's ``grpc-timeout`` is its deadline. The route
  timeout bounds it only where the route sets ``timeout`` explicitly: counted
  as above (silence while the client streams, then the whole response), it
  ends the call with DEADLINE_EXCEEDED, as trailers once the response has
  started.
* ``0s`` disables the route timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyproxy.addresses import Address
from pyproxy.config import ClusterConfig, HttpSettings, ListenerConfig, ProxyConfig

DEFAULT_TIMEOUT = 15.0
DEFAULT_IDLE_TIMEOUT = 4.0  # an upstream connection kept idle, without a cluster's own


class Cluster:
    """Endpoints of one upstream service, picked round robin."""

    __slots__ = ("name", "endpoints", "protocol", "idle_timeout", "connect_timeout", "_next")

    def __init__(
        self,
        name: str,
        endpoints: tuple[Address, ...],
        protocol: str,
        idle_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        self.protocol = protocol
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._next = 0

    @classmethod
    def from_config(cls, config: ClusterConfig) -> Cluster:
        return cls(
            config.name,
            config.endpoints,
            config.protocol,
            config.idle_timeout,
            config.connect_timeout,
        )

    def pick(self) -> Address:
        endpoints = self.endpoints
        index = self._next
        self._next = (index + 1) % len(endpoints)
        return endpoints[index]

    def peek(self) -> Address:
        """The endpoint ``pick`` returns next, without taking its turn."""
        return self.endpoints[self._next]


@dataclass(frozen=True, slots=True)
class Route:
    authority: str  # lower-case host without port, or "*"
    prefix: bytes
    # None: the listener's default (its upstream, or the original destination)
    cluster: Cluster | None
    timeout: float  # plain HTTP exchanges (0: none)
    filters: tuple | None = None  # FilterSpecs overriding the listener's chain; None keeps it
    grpc_timeout: float = 0.0  # gRPC calls: only an explicit route timeout (0: none)
    # {filter name: {key: value}} (RouteConfig.metadata); a dict: left out of hash and eq
    metadata: dict | None = field(default=None, hash=False, compare=False)
    name: str = ""  # RouteConfig.name
    filter_context: dict | None = field(default=None, hash=False, compare=False)


def route_timeouts(configured: float | None) -> tuple[float, float]:
    """(plain HTTP, gRPC) route timeouts from a route's ``timeout`` (None: not set)."""
    if configured is None:
        return DEFAULT_TIMEOUT, 0.0
    return configured, configured


class Router:
    """Built once per listener at config time; `match` is a linear scan in config order (first wins)."""

    def __init__(
        self, listener: ListenerConfig, config: ProxyConfig, clusters: dict[str, Cluster]
    ) -> None:
        self.routes = tuple(
            _route(
                r.authority,
                r.prefix.encode(),
                clusters[r.cluster] if r.cluster else None,
                r.timeout,
                r.filters,
                r.metadata or None,
                r.name,
                r.filter_context or None,
            )
            for r in listener.routes
        )
        self.default_route = _route("*", b"/", None, None, None) if not self.routes else None
        default_cluster = None
        if listener.upstream is not None:
            default_cluster = Cluster(
                f"{listener.name}-upstream",
                (listener.upstream,),
                listener.http.upstream_protocol,
                4.0,
                listener.connect_timeout,
            )
        self.default_cluster = default_cluster
        self.sole_route = self._sole_route()

    def _sole_route(self) -> Route | None:
        """The route every origin-form request takes, if there is one: the default route, or a
        first route matching any authority and path (routes after it are unreachable)."""
        if self.default_route is not None:
            return self.default_route
        first = self.routes[0] if self.routes else None
        if first is not None and first.authority == "*" and first.prefix in (b"", b"/"):
            return first
        return None

    def match(self, authority: bytes, path: bytes) -> Route | None:
        if self.default_route is not None:
            return self.default_route
        host = _host_of(authority)
        for route in self.routes:
            if (route.authority == "*" or route.authority == host) and path.startswith(
                route.prefix
            ):
                return route
        return None


def _route(
    authority: str,
    prefix: bytes,
    cluster: Cluster | None,
    timeout: float | None,
    filters,
    metadata: dict | None = None,
    name: str = "",
    filter_context: dict | None = None,
) -> Route:
    plain, grpc = route_timeouts(timeout)
    return Route(authority, prefix, cluster, plain, filters, grpc, metadata, name, filter_context)


def _host_of(authority: bytes) -> str:
    """Lower-case host without the port; IPv6 literals keep their brackets."""
    text = authority.decode("latin-1").lower()
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.rsplit(":", 1)[0] if ":" in text else text


def build_clusters(config: ProxyConfig) -> dict[str, Cluster]:
    return {cluster.name: Cluster.from_config(cluster) for cluster in config.clusters}


def connection_timeouts(
    cluster: Cluster | None, listener_connect_timeout: float
) -> tuple[float, float]:
    """A new upstream connection's connect timeout and idle timeout: its cluster's, else the
    listener's connect timeout and the default idle timeout."""
    if cluster is None:
        return listener_connect_timeout, DEFAULT_IDLE_TIMEOUT
    return cluster.connect_timeout, cluster.idle_timeout


def sole_route(router: Router, settings: HttpSettings) -> tuple[Route, str] | None:
    """The one route every request of the listener takes, and its upstream protocol, when a
    native lane may carry requests at all (every lane's rule): no per-request stage trace
    (Server-Timing) or access log line to keep, one route to one endpoint."""
    route = router.sole_route
    if (
        settings.access_log
        or settings.server_timing
        or route is None
        or (route.cluster is not None and len(route.cluster.endpoints) != 1)
    ):
        return None
    cluster = route.cluster if route.cluster is not None else router.default_cluster
    return route, cluster.protocol if cluster is not None else settings.upstream_protocol
