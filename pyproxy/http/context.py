"""What every HTTP session of one listener shares: settings, router, pool, codecs, stage slots, log.

Built by build.py, which also gives it its upstream pool and native lane: the
modules that implement those use this one, so this one only knows their seams.
"""

from __future__ import annotations

from typing import Any

from pyproxy.admission import Admission
from pyproxy.chain.api import FactoryContext
from pyproxy.chain.http_chain import ChainFactory
from pyproxy.codec.http1 import Http1Codec, Http1Limits
from pyproxy.codec.http1_backend import make_http1_codec
from pyproxy.config import ListenerConfig, ListenerMode, ProxyConfig
from pyproxy.counters import IPC, PARSE, READ, STAGE_EVENTS, STAGE_NS, STAGES, WRITE
from pyproxy.http.access_log import AccessLog
from pyproxy.http.router import Route, Router, build_clusters
from pyproxy.http.seams import H2Lanes, Lanes, Pool
from pyproxy.io.connector import Connect
from pyproxy.io.deadlines import Deadlines


class HttpContext:
    """Built once per listener (and rebuilt on reload); sessions hold a reference, never copy."""

    connector = Connect  # what opens upstream connections (a test harness may hand its own)
    pool: Pool  # set by build.py
    native_lanes: Lanes | None  # set by build.py: how connections pair in C; None: they never do
    h2_lanes: H2Lanes | None  # set by build.py: HTTP/2 requests carried in C; None: never

    def __init__(
        self, loop, listener: ListenerConfig, config: ProxyConfig, block: memoryview, timed: bool,
        admission: Admission,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.listener = listener
        self.settings = listener.http
        self.block = block
        self.timed = timed
        self.router = Router(listener, config, build_clusters(config))
        self.deadlines = Deadlines(loop)
        self.admission = admission  # the worker's, shared by its listeners
        self.limits = Http1Limits(
            max_header_bytes=listener.http.max_header_bytes,
            max_header_count=listener.http.max_headers,
        )
        self.access_log = (
            AccessLog.open(listener.http.access_log, listener.name)
            if listener.http.access_log
            else None
        )
        # Every request on a gRPC listener is a call (read per request: a bool, not the enum).
        self.grpc_only = listener.mode is ListenerMode.GRPC
        down_app = listener.app_side == "downstream"
        self.downstream_stages = (IPC, IPC) if down_app else (READ, WRITE)
        self.upstream_stages = (READ, WRITE) if down_app else (IPC, IPC)
        self.connect_stage = WRITE if down_app else IPC
        self.parse_ns, self.parse_events = STAGE_NS + PARSE, STAGE_EVENTS + PARSE
        self.h2_flushes: Any = None  # the HTTP/2 sessions' shared flush queue, made on first use
        # Stage slots a callback can add to: the base stages plus this listener's filters.
        self.claim_end = STAGE_NS + len(STAGES) + len(listener.filter_names)
        self._chains = self._build_chains(loop, listener, config)
        self.native_lanes = None
        self.h2_lanes = None

    def _build_chains(self, loop, listener: ListenerConfig, config: ProxyConfig) -> dict:
        """Chain factories, built once: the listener's, and each route's override (None = no filters)."""
        slots = {name: i for i, name in enumerate(listener.filter_names)}
        clusters = {cluster.name: cluster for cluster in config.clusters}
        context = FactoryContext(
            loop, listener.name, listener.mode, self.block, slots, clusters=clusters
        )

        def build(specs) -> ChainFactory | None:
            return ChainFactory(specs, context, slots) if specs else None

        default = build(listener.filters)
        chains: dict = {None: default}
        for route in self.router.routes:
            chains[id(route)] = default if route.filters is None else build(route.filters)
        return chains

    def connect(self, target, timeout: float, on_connected, on_failed, source: str = "") -> Connect:
        """Open an upstream connection, its time charged to the connect stage."""
        stage = self.connect_stage
        return self.connector(
            self.loop, target, timeout, on_connected, on_failed, source_host=source,
            block=self.block if self.timed else None, stage_ns=STAGE_NS + stage, stage_events=STAGE_EVENTS + stage,
        )  # fmt: skip

    def account_parse(self, elapsed: int, trace: list[int] | None) -> None:
        """Protocol work (codec, HTTP/2 state machine, gRPC framing) into the `parse` stage."""
        block = self.block
        block[self.parse_ns] += elapsed
        block[self.parse_events] += 1
        if trace is not None:
            trace[PARSE] += elapsed

    def chain_for(self, route: Route) -> ChainFactory | None:
        return self._chains.get(id(route), self._chains[None])

    def server_codec(self) -> Http1Codec:
        return make_http1_codec(self.settings.codec, "server", self.limits)

    def client_codec(self) -> Http1Codec:
        return make_http1_codec(self.settings.codec, "client", self.limits)

    def close(self) -> None:
        # Deadlines are left alone: in-flight requests of a draining listener keep their timeouts
        # (its tick stops by itself once none is armed).
        self.pool.close_idle()
        for chain in {id(c): c for c in self._chains.values() if c is not None}.values():
            chain.close()
        if self.access_log is not None:
            self.access_log.close()
