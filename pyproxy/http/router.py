"""Routing for HTTP mode: authority + path prefix → a cluster of endpoints (round robin), with a timeout."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyproxy.addresses import Address
from pyproxy.config import ClusterConfig, ListenerConfig, ProxyConfig

DEFAULT_TIMEOUT = 15.0


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
    timeout: float
    filters: tuple | None = None  # FilterSpecs overriding the listener's chain; None keeps it
    # {filter name: {key: value}} (RouteConfig.metadata); a dict: left out of hash and eq
    metadata: dict | None = field(default=None, hash=False, compare=False)


class Router:
    """Built once per listener at config time; `match` is a linear scan in config order (first wins)."""

    def __init__(
        self, listener: ListenerConfig, config: ProxyConfig, clusters: dict[str, Cluster]
    ) -> None:
        self.routes = tuple(
            Route(
                r.authority,
                r.prefix.encode(),
                clusters[r.cluster] if r.cluster else None,
                r.timeout,
                r.filters,
                r.metadata or None,
            )
            for r in listener.routes
        )
        # gRPC streams may live long: only their own grpc-timeout bounds them by default.
        default_timeout = 0.0 if listener.mode == "grpc" else DEFAULT_TIMEOUT
        self.default_route = Route("*", b"/", None, default_timeout) if not self.routes else None
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


def _host_of(authority: bytes) -> str:
    """Lower-case host without the port; IPv6 literals keep their brackets."""
    text = authority.decode("latin-1").lower()
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.rsplit(":", 1)[0] if ":" in text else text


def build_clusters(config: ProxyConfig) -> dict[str, Cluster]:
    return {cluster.name: Cluster.from_config(cluster) for cluster in config.clusters}
