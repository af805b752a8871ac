"""A listener: accepts connections, decides where each goes, connects upstream and starts the relay."""

from __future__ import annotations

import logging
import socket
from functools import partial
from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyproxy.addresses import Address
from pyproxy.admission import Admission
from pyproxy.config import ListenerConfig, ListenerKind, ListenerMode, ProxyConfig
from pyproxy.counters import (
    CONNECTIONS_ACTIVE,
    CONNECTIONS_TOTAL,
    FLAG_BASE,
    FLAG_INDEX,
    IPC,
    READ,
    STAGE_EVENTS,
    STAGE_NS,
    WRITE,
    observe_duration,
)
from pyproxy.io import original_dst, sockets
from pyproxy.io.acceptor import Acceptor
from pyproxy.io.backends import relay_factory
from pyproxy.io.connector import Connect
from pyproxy.io.first_bytes import FirstBytes
from pyproxy.io.relay import Relay

if TYPE_CHECKING:
    from pyproxy.chain.tcp_chain import TcpChainFactory
    from pyproxy.http.context import HttpContext
    from pyproxy.http.downstream_h1 import Http1Downstream

log = logging.getLogger("pyproxy.listener")


class _PendingConnect:
    """A downstream connection waiting for its upstream connect; closable by drain like a relay."""

    __slots__ = ("listener", "downstream", "started_ns", "connect", "preload", "filters")

    def __init__(
        self,
        listener: Listener,
        downstream: socket.socket,
        target: Address,
        source: str,
        started_ns: int,
    ) -> None:
        self.listener = listener
        self.downstream = downstream
        self.started_ns = started_ns
        self.preload = b""  # bytes protocol detection read before choosing TCP
        self.filters: list | None = None  # TCP filter instances that watch the stream
        block = listener.block if listener.timed else None
        self.connect = Connect(
            listener.loop,
            target,
            listener.config.connect_timeout,
            self._connected,
            self._failed,
            source_host=source,
            block=block,
            stage_ns=listener.connect_ns,
            stage_events=listener.connect_events,
        )

    def _connected(self, upstream: socket.socket) -> None:
        self.listener.connections.discard(self)
        self.listener.start_relay(
            self.downstream, upstream, self.started_ns, self.preload, self.filters
        )

    def _failed(self, flag: str) -> None:
        self.listener.connections.discard(self)
        if self.filters:
            from pyproxy.io.filtered_relay import filters_closed  # lazy: TCP filters only

            filters_closed(self.filters, flag)
        self.listener.fail(self.downstream, flag, self.started_ns)

    def close(self, flag: str = "LR") -> None:
        self.connect.cancel()
        self._failed(flag)


class Listener:
    """Accept loop and per-connection routing for one configured listener."""

    def __init__(
        self,
        loop,
        config: ListenerConfig,
        block: memoryview,
        timed: bool,
        connections: set,
        proxy_config: ProxyConfig,
        admission: Admission | None = None,
    ) -> None:
        self.loop = loop
        self.config = config
        self.block = block
        self.timed = timed
        self.connections = connections
        # The worker's, shared by its listeners; a listener on its own has limits of its own.
        self.admission = admission or Admission(connections, proxy_config)
        self.acceptor = Acceptor(
            loop, config.name, block, timed, self.admission.connection_allowed, self._accepted
        )
        self.draining = False  # stopped accepting: sessions starting now drain from the start
        self._set_stages()
        self._relay = relay_factory(config)
        self._original_destination = original_dst.resolver(config)
        self.proxy_config = proxy_config
        self.http: HttpContext | None = self._http_context()
        self.tcp_chain: TcpChainFactory | None = self._tcp_chain()

    def _tcp_chain(self) -> TcpChainFactory | None:
        config = self.config
        if config.mode is not ListenerMode.TCP or not config.filters:
            return None
        # lazy: the filter machinery loads only for listeners with TCP filters
        from pyproxy.chain.api import FactoryContext
        from pyproxy.chain.tcp_chain import TcpChainFactory

        slots = {name: i for i, name in enumerate(config.filter_names)}
        context = FactoryContext(self.loop, config.name, config.mode, self.block, slots)
        chain = TcpChainFactory(config.filters, context, slots)
        return chain if chain.factories else None

    def _http_context(self) -> HttpContext | None:
        if self.config.mode is ListenerMode.TCP:
            return None
        # lazy: the HTTP stack (h2, codecs, filters' chain) loads only for listeners that speak
        # HTTP: a TCP-only worker stays small.
        from pyproxy.http.build import http_context

        assert self.proxy_config is not None, "HTTP listeners are built with the proxy config"
        return http_context(
            self.loop, self.config, self.proxy_config, self.block, self.timed, self.admission
        )

    def _set_stages(self) -> None:
        down_app = self.config.app_side == "downstream"
        accept_stage = IPC if down_app else READ
        connect_stage = WRITE if down_app else IPC
        self.acceptor.set_stage(accept_stage)
        self.connect_ns, self.connect_events = (
            STAGE_NS + connect_stage,
            STAGE_EVENTS + connect_stage,
        )

    def start(self) -> None:
        self.acceptor.listen(self.config.addresses, self.config.transparent)

    def update(self, config: ListenerConfig) -> None:
        """Take a reloaded config with the same addresses; live connections keep the old one."""
        if config.original_dst != self.config.original_dst:
            self._original_destination = original_dst.resolver(config)
        self.config = config
        self._set_stages()
        self._relay = relay_factory(config)
        if self.http is not None:
            self.http.close()
        self.http = self._http_context()
        if self.tcp_chain is not None:
            self.tcp_chain.close()
        self.tcp_chain = self._tcp_chain()

    def stop_accepting(self) -> None:
        self.draining = True
        if self.http is not None:
            self.http.pool.close_idle()
        self.acceptor.stop()  # connections already in the backlog are served, and drain
        start_draining(list(self.connections))
        self.acceptor.close()

    def _accepted(self, conn: socket.socket) -> None:
        """Count an accepted connection and serve it; one that cannot be served is closed."""
        started = perf_counter_ns()
        block = self.block
        block[CONNECTIONS_TOTAL] += 1
        block[CONNECTIONS_ACTIVE] += 1
        try:
            # A new fd number has no watcher: any the loop still holds for it is a stale
            # one, left by a socket closed while watched. Drop it, or it cannot be watched.
            fd = conn.fileno()
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
            self._handle(conn, started)
        except RuntimeError as exc:
            # The loop refused to watch it anyway: close it and count it, never leak it.
            log.error("%s: cannot serve an accepted connection: %s", self.config.name, exc)
            self._abandon(conn, started)

    def _abandon(self, conn: socket.socket, started: int) -> None:
        for holder in list(self.connections):
            if _socket_of(holder) is conn:
                holder.close("LR")  # its own ending closes the socket and counts it
                return
        self.fail(conn, "LR", started)

    def _handle(self, conn: socket.socket, started: int) -> None:
        try:
            target, source = self._route(conn)
        except OSError as exc:
            log.debug("no original destination on %s: %s", self.config.name, exc)
            target = None
        if target is None:
            self.fail(conn, "NR", started)
            return
        if self.http is not None:
            self._detect(conn, target, source, started)
            return
        if self.tcp_chain is not None:
            from pyproxy.chain.tcp_chain import ConnectionGate  # lazy: TCP filters only

            gate = ConnectionGate(self.tcp_chain, self, conn, target, source, started)
            self.connections.add(gate)
            gate.run()
            return
        self.connect_upstream(conn, target, source, started)

    def _detect(self, conn: socket.socket, target: Address, source: str, started: int) -> None:
        """Mode http: the configured protocol, or the first bytes', read by the I/O layer."""
        # lazy: the HTTP stack loads only for listeners that speak HTTP
        from pyproxy.http.detect import AUTO, HTTP, Detection, protocol_for

        config = self.config
        port = None
        if config.ports:
            # Where the client was going: the listening port when standalone.
            port = (
                sockets.local_port(conn) if config.kind is ListenerKind.STANDALONE else target.port
            )
        protocol = protocol_for(config, port)
        if protocol not in (AUTO, HTTP):
            self.start_protocol(conn, target, source, started, protocol)
            return
        http = self.http
        assert http is not None, "detection runs on mode-http listeners"
        reader = FirstBytes(
            self.loop, conn, self.block, self.timed, http.downstream_stages[0],
            Detection(config, protocol), partial(self._detected, target, source, started),
        )  # fmt: skip
        self.connections.add(reader)
        reader.start()

    def _detected(
        self, target: Address, source: str, started: int, reader: FirstBytes,
        protocol: str | None, flag: str,
    ) -> None:  # fmt: skip
        self.connections.discard(reader)
        if protocol is None:
            self.drop(reader.sock, flag, started)
        else:
            self.start_protocol(reader.sock, target, source, started, protocol, reader.data)

    def connect_upstream(
        self,
        conn: socket.socket,
        target: Address,
        source: str,
        started: int,
        filters: list | None = None,
    ) -> None:
        pending = _PendingConnect(self, conn, target, source, started)
        pending.filters = filters
        self.connections.add(pending)

    def start_protocol(
        self, conn: socket.socket, target: Address, source: str, started: int, protocol: str,
        preload: bytes = b"",
    ) -> None:  # fmt: skip
        """Mode http, protocol known (configured or detected): every byte read so far goes along."""
        # lazy: the HTTP stack loads only for listeners that speak HTTP
        from pyproxy.http.detect import HTTP2, TCP
        from pyproxy.http.downstream_h1 import Http1Downstream

        if protocol == TCP:
            pending = _PendingConnect(self, conn, target, source, started)
            pending.preload = preload
            self.connections.add(pending)
            return
        http = self.http
        assert http is not None, "start_protocol runs on mode-http listeners only"
        if protocol == HTTP2:
            # lazy: hyper-h2 loads with the first HTTP/2 connection; an HTTP/1-only worker never
            # holds it (its modules would also land in the arenas a burst of connections fills)
            from pyproxy.http.downstream_h2 import Http2Downstream

            h2 = Http2Downstream(http, conn, self._session_closed, target, source)
            self.connections.add(h2)
            h2.start(preload)
            if self.draining:  # accepted before the drain, its protocol known only now
                h2.start_drain()
            return
        h1 = Http1Downstream(http, conn, self._session_closed, target, source)
        self.connections.add(h1)
        if self.draining:
            h1.start_drain()
        h1.start()
        if preload:
            h1.data_received(preload)

    def drop(self, conn: socket.socket, flag: str, started_ns: int) -> None:
        """Closed before a protocol was chosen (EOF, error, header timeout, drain)."""
        if flag:
            self.block[FLAG_BASE + FLAG_INDEX[flag]] += 1
        self.block[CONNECTIONS_ACTIVE] -= 1
        observe_duration(self.block, perf_counter_ns() - started_ns)
        conn.close()

    def _route(self, conn: socket.socket) -> tuple[Address | None, str]:
        config = self.config
        if config.upstream is not None:
            # Standalone, or outbound on unix: (a Unix socket has no original destination).
            return config.upstream, ""
        destination, redirected = self._original_destination(conn)
        if not redirected and not config.transparent:
            # Reached directly, not through capture: forwarding would loop back to ourselves.
            return None, ""
        if config.kind is ListenerKind.OUTBOUND:
            return destination, ""
        if config.app_socket is not None:
            # The app serves on a Unix socket: one path, or one per captured port.
            path = config.app_socket.path.replace("{port}", str(destination.port))
            return Address(path=path), ""
        # Inbound: deliver to the local app at the port the client asked for.
        if conn.family == socket.AF_INET6:
            host = config.inbound_target if ":" in config.inbound_target else "::1"
            return Address(host=host, port=destination.port), config.inbound_source_v6
        return Address(host=config.inbound_target, port=destination.port), config.inbound_source

    def start_relay(
        self, downstream: socket.socket, upstream: socket.socket, started_ns: int,
        preload: bytes = b"", filters: list | None = None,
    ) -> None:  # fmt: skip
        config = self.config
        relay_class = self._relay
        if filters and self.tcp_chain is not None:
            # lazy: TCP filters only
            from pyproxy.io.editing_relay import EditingRelay
            from pyproxy.io.filtered_relay import FilteredRelay

            chosen = EditingRelay if self.tcp_chain.edits_stream else FilteredRelay
            relay_class = partial(chosen, filters=filters, stages=self.tcp_chain.stages)
        try:
            relay = relay_class(
                self.loop,
                downstream,
                upstream,
                self.block,
                timed=self.timed,
                app_side=config.app_side,
                buffer_size=config.buffer_size,
                idle_timeout=config.idle_timeout,
                started_ns=started_ns,
                on_close=self._relay_closed,
            )
        except OSError as exc:
            # A backend's per-connection resource (pipe, SO_ZEROCOPY) was refused: e.g. EMFILE.
            log.warning("%s: cannot start the relay: %s", config.name, exc)
            if filters:
                from pyproxy.io.filtered_relay import filters_closed  # lazy: TCP filters only

                filters_closed(filters, "LR")
            upstream.close()
            self.fail(downstream, "LR", started_ns)
            return
        if preload:
            relay.preload(preload, b"")
        self.connections.add(relay)
        relay.start()

    def _session_closed(self, session: Http1Downstream, tunnel: tuple | None = None) -> None:
        """An HTTP connection ended, or switched protocols and becomes a byte relay (WebSocket, CONNECT)."""
        self.connections.discard(session)
        if tunnel is None:
            self.block[CONNECTIONS_ACTIVE] -= 1
            return
        upstream, from_downstream, from_upstream = tunnel
        down_sock, down_unsent = session.stream.detach()
        up_sock, up_unsent = upstream.stream.detach()
        relay = Relay(
            self.loop, down_sock, up_sock, self.block, timed=self.timed, app_side=self.config.app_side,
            buffer_size=self.config.buffer_size, idle_timeout=self.config.idle_timeout,
            started_ns=perf_counter_ns(), on_close=self._relay_closed,
        )  # fmt: skip
        relay.preload(up_unsent + from_downstream, down_unsent + from_upstream)
        self.connections.add(relay)
        relay.start()

    def _relay_closed(self, relay: Relay) -> None:
        self.connections.discard(relay)
        self.block[CONNECTIONS_ACTIVE] -= 1

    def fail(self, downstream: socket.socket, flag: str, started_ns: int) -> None:
        """The connection could not be relayed: close the downstream and count why."""
        block = self.block
        block[FLAG_BASE + FLAG_INDEX[flag]] += 1
        block[CONNECTIONS_ACTIVE] -= 1
        observe_duration(block, perf_counter_ns() - started_ns)
        downstream.close()


def _socket_of(holder) -> socket.socket | None:
    """The downstream socket of whatever `connections` holds (sessions, detectors, pending)."""
    for name in ("sock", "downstream"):
        sock = getattr(holder, name, None)
        if isinstance(sock, socket.socket):
            return sock
    stream = getattr(holder, "stream", None)
    return getattr(stream, "sock", None)


def start_draining(connections: list) -> list:
    """Ask each HTTP connection to close once its work in flight is answered (HTTP/1: Connection:
    close; HTTP/2: GOAWAY, RFC 9113 §6.8); returns those asked. TCP relays have no such point."""
    asked = []
    for connection in connections:
        start_drain = getattr(connection, "start_drain", None)
        if start_drain is not None:
            start_drain()
            asked.append(connection)
    return asked
