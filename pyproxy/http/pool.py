"""The upstream pools: idle HTTP/1.1 keep-alive connections per endpoint, and the HTTP/2 pool."""

from __future__ import annotations

import socket
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from pyproxy.addresses import Address
from pyproxy.http.context import HttpContext
from pyproxy.http.router import Cluster, connection_timeouts
from pyproxy.http.upstream_h1 import Http1Upstream
from pyproxy.io.connector import Connect

if TYPE_CHECKING:
    from pyproxy.http.upstream_h2 import Http2Pool

SWEEP_INTERVAL = 0.5  # idle connections live at most their timeout plus this


class _Attach:
    """A pending acquire: cancellable while the connect is in flight."""

    __slots__ = ("connect",)

    def __init__(self, connect: Connect | None) -> None:
        self.connect = connect

    def cancel(self) -> None:
        if self.connect is not None:
            self.connect.cancel()
            self.connect = None


_READY = _Attach(None)  # what a pooled connection's acquire returns: nothing to cancel


class UpstreamPool:
    """Idle keep-alive connections per endpoint, newest first (the warmest, least likely closed)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.idle: dict[Address, list[Http1Upstream]] = defaultdict(list)
        self._h2: Http2Pool | None = None
        self._sweeper = None

    @property
    def h2(self) -> Http2Pool:
        """The HTTP/2 upstream pool, made (and h2 imported) when a route first needs one."""
        if self._h2 is None:
            # lazy: the h2 library (and its memory) loads only on a listener that needs HTTP/2
            from pyproxy.http.upstream_h2 import Http2Pool

            self._h2 = Http2Pool(self.ctx)
        return self._h2

    def acquire(
        self, target: Address, source: str, cluster: Cluster | None, on_ready, on_failed
    ) -> _Attach:
        protocol = cluster.protocol if cluster is not None else self.ctx.settings.upstream_protocol
        if protocol == "http2":
            return self.h2.acquire(target, source, cluster, on_ready, on_failed)
        conn = self.take_idle(target)
        if conn is not None:
            on_ready(conn)
            return _READY
        ctx = self.ctx
        timeout, idle_timeout = connection_timeouts(cluster, ctx.listener.connect_timeout)
        attach = _Attach(None)

        def connected(sock: socket.socket) -> None:
            attach.connect = None
            on_ready(Http1Upstream(ctx, target, sock, idle_timeout))

        def failed(flag: str) -> None:
            attach.connect = None
            on_failed(flag)

        attach.connect = ctx.connect(target, timeout, connected, failed, source)
        return attach

    def release(self, conn: Any) -> None:
        """Take back an upstream: an HTTP/1 connection (pooled if reusable) or an HTTP/2 stream."""
        if conn.multiplexed:
            conn.release()
            return
        if conn.reusable():
            conn.park()
            self.keep(conn)
        else:
            conn.exchange = None
            conn.stream.close()

    def take_idle(self, target: Address) -> Http1Upstream | None:
        """The newest pooled connection to ``target`` still open (the warmest), or None."""
        idle = self.idle.get(target)
        while idle:
            conn = idle.pop()
            if not conn.stream.closed:
                return conn
        return None

    def keep(self, conn: Http1Upstream) -> None:
        """Pool a connection at rest: parked after an exchange, or back from the express lane."""
        conn.idle_since = self.ctx.loop.time()  # the sweeper closes it once idle too long
        self.idle[conn.key].append(conn)
        if self._sweeper is None:
            self._sweeper = self.ctx.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        """Close pooled connections idle past their timeout: one timer per pool, not one per request."""
        self._sweeper = None
        now = self.ctx.loop.time()
        for conns in self.idle.values():
            expired = [c for c in conns if now - c.idle_since >= c.idle_timeout]
            for conn in expired:
                conns.remove(conn)
                conn.stream.close()
        if any(self.idle.values()):
            self._sweeper = self.ctx.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def forget(self, conn: Http1Upstream) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close_idle(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._h2 is not None:
            self._h2.close_idle()
        for conns in self.idle.values():
            for conn in conns:
                conn.stream.close()
        self.idle.clear()
