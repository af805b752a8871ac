"""A listener's HTTP context, assembled: the shared context, its upstream pool, its native lanes."""

from __future__ import annotations

from pyproxy.admission import Admission
from pyproxy.config import ListenerConfig, ProxyConfig
from pyproxy.http.context import HttpContext
from pyproxy.http.h2_lane import h2_lanes
from pyproxy.http.native_lane import native_lanes
from pyproxy.http.pool import UpstreamPool


def http_context(
    loop, listener: ListenerConfig, config: ProxyConfig, block: memoryview, timed: bool,
    admission: Admission,
) -> HttpContext:  # fmt: skip
    """Built once per listener (and rebuilt on reload)."""
    ctx = HttpContext(loop, listener, config, block, timed, admission)
    ctx.pool = UpstreamPool(ctx)
    ctx.native_lanes = native_lanes(ctx)
    ctx.h2_lanes = h2_lanes(ctx)
    if ctx.h2_lanes is None and ctx.grpc_only:
        from pyproxy.http.grpc_lane import grpc_lanes  # lazy: hyper-h2, gRPC listeners only

        ctx.h2_lanes = grpc_lanes(ctx)
    return ctx
