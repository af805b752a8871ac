"""Validate YAML (or flags) into immutable runtime config; every error names file, field and reason."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

from pyproxy.addresses import Address, parse_address
from pyproxy.counters import MAX_FILTERS
from pyproxy.durations import parse_duration


class ListenerMode(StrEnum):
    """The protocol a listener relays: opaque bytes, HTTP (1.1 and 2), or gRPC."""

    TCP = "tcp"
    HTTP = "http"
    GRPC = "grpc"


class ListenerKind(StrEnum):
    """Where a listener's traffic comes from: sent to it directly, or captured by iptables."""

    STANDALONE = "standalone"
    INBOUND = "inbound"
    OUTBOUND = "outbound"


MODES = tuple(mode.value for mode in ListenerMode)
KINDS = tuple(kind.value for kind in ListenerKind)
# Modes whose data path exists in this build; the others are refused at load time.
IMPLEMENTED_MODES = MODES

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_DEFAULT = "127.0.0.1:15000"
PROMETHEUS_DEFAULT = "0.0.0.0:15090"
HEALTH_DEFAULT = "0.0.0.0:15021"
# Source address for inbound deliveries, so capture rules can tell them from app traffic.
INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::6"
# I/O backends (chosen per listener by pyproxy/io/backends.py).
# sockmap: the app still connects over loopback TCP; an eBPF program moves the bytes socket to
# socket (native/sockmap.bpf.c, installed by pyproxy/io/fast_path.py).
IPC_KINDS = ("tcp", "uds", "sockmap")
WRITE_BACKENDS = ("send", "zerocopy")
RELAY_BACKENDS = ("copy", "splice")
RELAY_DISPATCH = ("auto", "loop", "libuv")
BUFFER_SIZE_DEFAULT = 65536  # the zerocopy writer's: it pays per send, so bigger sends
# The copy relay's: a read and its write touch the buffer twice, and 16 KiB stays in the
# CPU's near caches where 64 KiB does not (a third less CPU per GB moved, measured).
COPY_BUFFER_DEFAULT = 16384
# A pipe holds page references, not copies, and a bigger one lets one splice move a whole
# receive queue: fewer calls and less CPU per GB. 1 MiB is also what an unprivileged
# process may ask for (/proc/sys/fs/pipe-max-size).
SPLICE_PIPE_DEFAULT = 1024 * 1024
# Below this many bytes a zerocopy listener sends by copy: pinning pages and reaping the
# completion cost more than copying (see README "Native I/O paths" for the measurement).
ZEROCOPY_THRESHOLD_DEFAULT = 16384
# Per worker. An idle connection costs a few KB of the worker's memory (bench/memory.py), so the
# connection limit is set by file descriptors: the worker raises RLIMIT_NOFILE to fit it.
MAX_CONNECTIONS_DEFAULT = 8192
MAX_PENDING_REQUESTS_DEFAULT = 4096


class ConfigError(Exception):
    """A config that cannot be used: where it came from, which field, and why."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source, self.path, self.reason = source, path, reason
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Per-listener HTTP behaviour (mode http)."""

    codec: str = "fast"  # fast (httptools/llhttp) | h11 (reference)
    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    request_header_timeout: float = 10.0  # slowloris guard: whole head must arrive within this
    idle_timeout: float = 300.0  # downstream keep-alive connection with no request in flight
    server_timing: bool = False
    access_log: str = ""  # "" (off) | "stdout" | a file path
    # Plain HTTP/1.1 exchanges in C once a connection qualifies (http/native_lane.py): "native",
    # or "off" (every request through the general path; "python" is read as "off").
    express_lane: str = "native"
    upstream_protocol: str = "http1"  # for the listener's default route
    # HTTP/2 (RFC 9113), per connection: advertised in SETTINGS and enforced.
    max_concurrent_streams: int = 100  # excess streams are refused (RST_STREAM REFUSED_STREAM)
    stream_window: int = 65535  # flow-control window per stream (§6.9.2): bytes held per stream
    connection_window: int = 1024 * 1024  # receive window per connection (§6.9.1)
    rapid_reset_max: int = 200  # client resets tolerated per window (CVE-2023-44487), then GOAWAY
    rapid_reset_window: float = 10.0
    # HTTP/2 codec: "native" (libnghttp2, when built; else h2) or "h2" (hyper-h2, pure Python).
    http2_codec: str = "native"
    # Plain HTTP/2 GETs to an HTTP/1 upstream carried in C on the native codec (http/h2_lane.py);
    # false keeps every stream on the general path.
    http2_lane: bool = True
    # Unary-shaped gRPC calls to an h2c upstream carried in C on the native codec
    # (http/grpc_lane.py); false keeps every call on the general path.
    grpc_lane: bool = True


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """Per-listener gRPC limits (mode grpc, and gRPC calls on mode http listeners)."""

    # Per direction, like gRPC's own 4 MiB receive default; larger → RESOURCE_EXHAUSTED.
    max_request_message_bytes: int = 4 * 1024 * 1024
    max_response_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One filter in a chain: its name (unique in the listener), its type (entry point) and validated config."""

    name: str
    type: str
    config: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Requests whose authority and path prefix match go to `cluster` ("" = the listener's default)."""

    authority: str = "*"
    prefix: str = "/"
    cluster: str = ""
    # None: unset, so each kind of exchange takes its default (router.py: route_timeouts)
    timeout: float | None = None
    filters: tuple[FilterSpec, ...] | None = None  # None: the listener's chain; () : no filters
    # Envoy's route metadata, {filter name: {key: value}}: what a filter program reads for this
    # route (Lua's handle:metadata()).
    metadata: dict = field(default_factory=dict, hash=False)
    name: str = ""  # Envoy's route name (route_name, Lua's streamInfo():routeName()); "" unnamed
    # Envoy's LuaPerRoute filter_context, {filter name: {key: value}}: Lua's filterContext().
    filter_context: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    endpoints: tuple[Address, ...]
    protocol: str = "http1"
    idle_timeout: float = 4.0  # pooled upstream connections: shorter than app servers' keep-alive
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    addresses: tuple[Address, ...]
    kind: ListenerKind = ListenerKind.STANDALONE
    mode: ListenerMode = ListenerMode.TCP
    upstream: Address | None = None
    # Which side of this listener talks to the local application (its syscalls are `ipc`).
    app_side: str = "upstream"
    inbound_target: str = "127.0.0.1"
    inbound_source: str = ""
    inbound_source_v6: str = ""
    transparent: bool = False
    # Outbound capture: netfilter (SO_ORIGINAL_DST) or ebpf (capture: ebpf's map).
    original_dst: str = "netfilter"
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    buffer_size: int = COPY_BUFFER_DEFAULT  # set by _io_backends: each backend has its default
    http: HttpSettings = HttpSettings()
    grpc: GrpcSettings = GrpcSettings()
    routes: tuple[RouteConfig, ...] = ()
    filters: tuple[FilterSpec, ...] = ()

    @property
    def filter_names(self) -> tuple[str, ...]:
        """Every filter name used by this listener or its routes, in first-seen order: the stage slots."""
        names: dict[str, None] = {spec.name: None for spec in self.filters}
        for route in self.routes:
            for spec in route.filters or ():
                names.setdefault(spec.name, None)
        return tuple(names)

    # I/O backends: app-facing transport, how TCP sockets are written, how TCP mode relays.
    ipc: str = "tcp"
    write: str = "send"
    relay: str = "copy"
    # Who runs the native copy step when a socket is readable: the event loop's Python callback
    # (loop), or libuv's poll callback in C with no Python in between (libuv; uvloop only);
    # auto: libuv where it can run (uvloop, the native module, relay: copy, write: send).
    relay_dispatch: str = "auto"
    zerocopy_threshold: int = ZEROCOPY_THRESHOLD_DEFAULT
    # Protocol detection (mode http): auto = HTTP/2 preface, HTTP/1 request line, else opaque
    # TCP; http = HTTP/2 or HTTP/1 only. Per destination port: tcp | http | http1 | http2.
    detect: str = "http"
    detect_timeout: float = 0.1
    ports: tuple[tuple[int, str], ...] = ()
    # Inbound only: deliver to the app's Unix socket instead of inbound_target:<port>.
    app_socket: Address | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...] = ()
    admin: Address | None = None
    prometheus: Address | None = None
    health: Address | None = None
    concurrency: int = 1
    stage_clock: bool = True
    drain_timeout: float = 5.0
    # Overload, per worker (pyproxy/admission.py): beyond max_connections a new connection is
    # closed at once; beyond max_pending_requests a request is answered 503 (gRPC UNAVAILABLE).
    max_connections: int = MAX_CONNECTIONS_DEFAULT
    max_pending_requests: int = MAX_PENDING_REQUESTS_DEFAULT
    # Capture listeners as root: only when the capture rules exclude uid 0 too (see cli).
    allow_root: bool = False
    source: str = "<flags>"
    raw: dict = field(default_factory=dict, compare=False)

    def listener(self, name: str) -> ListenerConfig:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


class _Fields:
    """Reads one mapping of the config, remembering the path for error messages."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path or "<top>", "expected a mapping")
        self.source, self.path, self.data = source, path, dict(data)

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self._join(key), reason)

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        try:
            return parse(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def nested(self, key: str) -> _Fields | None:
        if key not in self.data:
            return None
        return _Fields(self.source, self._join(key), self.data.pop(key))

    def done(self) -> None:
        if self.data:
            key = sorted(map(str, self.data))[0]
            raise self.error(key or '""', "unknown field")  # an empty key still gets a name


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return parse


E = TypeVar("E", bound=StrEnum)


def _enum_choice(enum: type[E]) -> Callable[[Any], E]:
    """Resolve a field once into its enum member; the error lists the values, as _choice does."""
    choose = _choice(tuple(member.value for member in enum))

    def parse(value: Any) -> E:
        return enum(choose(value))

    return parse


def _express_lane(value: Any) -> str:
    # YAML reads a bare `off` as false. "python" named a Python lane that is now the general
    # path's whole-message shortcut: older configs keep working and mean "off".
    value = "off" if value is False or value == "python" else value
    return _choice(("native", "off"))(value)


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {low}..{high}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.replace("_", "").replace("-", "").isalnum():
        raise ValueError("must be letters, digits, '-' or '_'")
    return value


def _optional_address(value: Any) -> Address | None:
    if value is None or value is False or value == "off":
        return None
    return parse_address(value)


def _ip(value: Any) -> str:
    return parse_address(f"[{value}]:0" if ":" in str(value) else f"{value}:0").host


def _optional_ip(value: Any) -> str:
    return "" if value in ("", None) else _ip(value)


def _listener(fields: _Fields, index: int) -> ListenerConfig:
    name = fields.take("name", _name, f"listener{index}")
    kind = fields.take("kind", _enum_choice(ListenerKind), ListenerKind.STANDALONE)
    mode = fields.take("mode", _enum_choice(ListenerMode), ListenerMode.TCP)
    if mode not in IMPLEMENTED_MODES:
        raise fields.error(
            "mode",
            f"mode {mode!r} is not available in this build (have: {', '.join(IMPLEMENTED_MODES)})",
        )
    if "address" in fields.data and "addresses" in fields.data:
        raise fields.error("addresses", "give either address or addresses, not both")
    addresses = fields.take("addresses", _address_list, None)
    if addresses is None:
        address = fields.take("address", parse_address, None)
        if address is None:
            raise fields.error("address", "required")
        addresses = (address,)
    upstream = fields.take("upstream", parse_address, None)
    _check_upstream(fields, kind, addresses, upstream)
    default_app_side = "downstream" if kind is ListenerKind.OUTBOUND else "upstream"
    listener = ListenerConfig(
        name=name,
        addresses=addresses,
        kind=kind,
        mode=mode,
        upstream=upstream,
        app_side=fields.take("app_side", _choice(("upstream", "downstream")), default_app_side),
        inbound_target=fields.take("inbound_target", _ip, "127.0.0.1"),
        inbound_source=fields.take("inbound_source", _optional_ip, ""),
        inbound_source_v6=fields.take("inbound_source_v6", _optional_ip, ""),
        transparent=fields.take("transparent", _bool, False),
        original_dst=_original_dst(fields, kind),
        connect_timeout=fields.take("connect_timeout", parse_duration, 5.0),
        idle_timeout=fields.take("idle_timeout", parse_duration, 3600.0),
        # 0 until _io_backends knows the relay: its default depends on it.
        buffer_size=fields.take("buffer_size", _int_range(1024, 16 * 1024 * 1024), 0),
        http=_http_settings(fields.nested("http"), mode),
        grpc=_grpc_settings(fields.nested("grpc"), mode),
        routes=_routes(fields, mode),
        filters=_filters(fields, mode) or (),
        **_detection(fields, kind, mode),
    )
    listener = _io_backends(fields, listener)
    fields.done()
    return listener


def _check_upstream(
    fields: _Fields, kind: ListenerKind, addresses: tuple[Address, ...], upstream: Address | None
) -> None:
    """Who needs `upstream`: standalone always; outbound only on unix: (no original destination)."""
    if kind is ListenerKind.STANDALONE:
        if upstream is None:
            raise fields.error("upstream", "required for a standalone listener")
        return
    unix = [a.is_unix for a in addresses]
    if kind is ListenerKind.OUTBOUND and any(unix):
        if not all(unix):
            raise fields.error(
                "addresses", "an outbound listener is either all unix: or all host:port; split it"
            )
        if upstream is None:
            raise fields.error(
                "upstream",
                "required for an outbound listener on unix: (a Unix socket has no original destination)",
            )
        return
    if any(unix):
        raise fields.error(
            "address",
            f"an {kind} capture listener needs host:port addresses (iptables captures TCP)",
        )
    if upstream is not None:
        hint = (
            "; to deliver to a Unix socket use app_socket" if kind is ListenerKind.INBOUND else ""
        )
        raise fields.error(
            "upstream",
            f"not used by an {kind} listener on host:port (it uses the original destination){hint}",
        )


def _app_socket(value: Any) -> Address:
    address = parse_address(value)
    if not address.is_unix:
        raise ValueError(f"expected unix:/path (the app's socket), got {value!r}")
    rest = address.path.replace("{port}", "")
    if "{" in rest or "}" in rest:
        raise ValueError("the only placeholder allowed in the path is {port}")
    return address


def _native_reason() -> str | None:
    """None when the native module loaded, else why not (imported only for native choices)."""
    from pyproxy import native  # type: ignore[attr-defined]  # lazy: only for native choices

    return None if native.AVAILABLE else str(native.UNAVAILABLE_REASON)


def _original_dst(fields: _Fields, kind: ListenerKind) -> str:
    value = fields.take("original_dst", _choice(("netfilter", "ebpf")), "netfilter")
    if value == "ebpf" and kind is not ListenerKind.OUTBOUND:
        raise fields.error("original_dst", "ebpf is for outbound capture listeners only")
    return value


def _check_sockmap(fields: _Fields, listener: ListenerConfig, derived: str) -> None:
    """sockmap redirects connections the app makes to this listener's fixed IPv4 ports."""
    if listener.app_side != "downstream":
        raise fields.error(
            "ipc",
            "sockmap redirects the app's connections to this listener: needs app_side: downstream "
            "(the default for outbound listeners)",
        )
    if derived != "tcp" or any(
        a.family != socket.AF_INET or a.port == 0 for a in listener.addresses
    ):
        shown = ", ".join(map(str, listener.addresses))
        raise fields.error(
            "ipc", f"sockmap needs IPv4 host:port listen addresses with a fixed port, got {shown}"
        )


def _io_backends(fields: _Fields, listener: ListenerConfig) -> ListenerConfig:
    """Validate ipc/write/relay/zerocopy_threshold/app_socket against the listener's sockets."""
    app_socket = fields.take("app_socket", _app_socket, None)
    if app_socket is not None and listener.kind is not ListenerKind.INBOUND:
        raise fields.error(
            "app_socket", "only for inbound listeners (a standalone listener names its upstream)"
        )
    # The app-facing side's addresses decide what the ipc stage measures.
    if listener.app_side == "downstream":
        app_role, app_addresses = "listen address", listener.addresses
    elif app_socket is not None:
        app_role, app_addresses = "app_socket", (app_socket,)
    elif listener.kind is ListenerKind.STANDALONE and listener.upstream is not None:
        app_role, app_addresses = "upstream", (listener.upstream,)
    else:
        app_role = "inbound_target"
        app_addresses = (Address(host=listener.inbound_target),)
    unix = [a.is_unix for a in app_addresses]
    if any(unix) and not all(unix):
        raise fields.error(
            "addresses", "the app-facing addresses mix unix: and host:port; use one listener each"
        )
    derived = "uds" if all(unix) else "tcp"
    ipc = fields.take("ipc", _choice(IPC_KINDS), derived)
    if ipc == "sockmap":
        _check_sockmap(fields, listener, derived)
    elif ipc != derived:
        shown = ", ".join(map(str, app_addresses))
        need = (
            "uds needs the app-facing address to be unix:/path"
            if ipc == "uds"
            else "tcp needs the app-facing address to be host:port"
        )
        raise fields.error("ipc", f"{need}; this listener's app side is its {app_role}: {shown}")
    write = fields.take("write", _choice(WRITE_BACKENDS), "send")
    relay = fields.take("relay", _choice(RELAY_BACKENDS), "copy")
    dispatch = fields.take("relay_dispatch", _choice(RELAY_DISPATCH), "auto")
    if dispatch == "libuv" and (relay != "copy" or write != "send"):
        raise fields.error(
            "relay_dispatch", "libuv runs the copy relay's step (relay: copy, write: send)"
        )
    has_threshold = "zerocopy_threshold" in fields.data
    threshold = fields.take(
        "zerocopy_threshold", _int_range(0, 1 << 30), ZEROCOPY_THRESHOLD_DEFAULT
    )
    peer_addresses = (
        (listener.upstream,) if listener.app_side == "downstream" else listener.addresses
    )
    if write == "zerocopy":
        if listener.mode is not ListenerMode.TCP:
            raise fields.error("write", "zerocopy is implemented for mode tcp only")
        if ipc == "uds" and all(a is not None and a.is_unix for a in peer_addresses):
            raise fields.error(
                "write",
                "zerocopy needs a TCP socket to write to; both sides of this listener are unix:",
            )
    elif has_threshold:
        raise fields.error("zerocopy_threshold", "only used with write: zerocopy")
    if relay == "splice":
        if listener.mode is not ListenerMode.TCP:
            raise fields.error(
                "relay", f"splice relays opaque bytes: tcp mode only, not {listener.mode}"
            )
        if write == "zerocopy":
            raise fields.error(
                "write", "zerocopy does not combine with relay: splice (splice already moves pages)"
            )
    native_only_values = (
        ("write", write, "zerocopy"), ("relay", relay, "splice"),
        ("relay_dispatch", dispatch, "libuv"),
    )  # fmt: skip
    for key, value, native_only in native_only_values:
        if value == native_only:
            reason = _native_reason()
            if reason is not None:
                raise fields.error(
                    key, f"{value} needs the native module (pyproxy.native), unavailable: {reason}"
                )
    default_buffer = (
        SPLICE_PIPE_DEFAULT
        if relay == "splice"
        else BUFFER_SIZE_DEFAULT
        if write == "zerocopy"
        else COPY_BUFFER_DEFAULT
    )
    return replace(
        listener,
        buffer_size=listener.buffer_size or default_buffer,
        ipc=ipc,
        write=write,
        relay=relay,
        relay_dispatch=dispatch,
        zerocopy_threshold=threshold,
        app_socket=app_socket,
    )


def _address_list(value: Any) -> tuple[Address, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of addresses")
    return tuple(parse_address(v) for v in value)


def _http_settings(fields: _Fields | None, mode: ListenerMode) -> HttpSettings:
    if fields is None:
        return (
            HttpSettings(upstream_protocol="http2") if mode is ListenerMode.GRPC else HttpSettings()
        )
    if mode is ListenerMode.TCP:
        raise ConfigError(fields.source, fields.path, "only for mode http or grpc")
    settings = HttpSettings(
        codec=fields.take("codec", _choice(("fast", "h11")), "fast"),
        max_header_bytes=fields.take("max_header_bytes", _int_range(1024, 1024 * 1024), 60 * 1024),
        max_headers=fields.take("max_headers", _int_range(1, 10000), 100),
        request_header_timeout=fields.take("request_header_timeout", parse_duration, 10.0),
        idle_timeout=fields.take("idle_timeout", parse_duration, 300.0),
        server_timing=fields.take("server_timing", _bool, False),
        access_log=fields.take("access_log", _access_log_target, ""),
        express_lane=fields.take("express_lane", _express_lane, "native"),
        # gRPC needs HTTP/2 end to end (trailers, streams both ways at once).
        upstream_protocol=fields.take(
            "upstream_protocol",
            _choice(("http2",) if mode is ListenerMode.GRPC else ("http1", "http2")),
            "http2" if mode is ListenerMode.GRPC else "http1",
        ),
        max_concurrent_streams=fields.take("max_concurrent_streams", _int_range(1, 10000), 100),
        # Not below the protocol default: the peer may send that much before our SETTINGS arrive.
        stream_window=fields.take("stream_window", _int_range(65535, 16 * 1024 * 1024), 65535),
        connection_window=fields.take(
            "connection_window", _int_range(65535, 256 * 1024 * 1024), 1024 * 1024
        ),
        rapid_reset_max=fields.take("rapid_reset_max", _int_range(1, 1_000_000), 200),
        rapid_reset_window=fields.take("rapid_reset_window", parse_duration, 10.0),
        http2_codec=fields.take("http2_codec", _choice(("native", "h2")), "native"),
        http2_lane=fields.take("http2_lane", _bool, True),
        grpc_lane=fields.take("grpc_lane", _bool, True),
    )
    fields.done()
    return settings


def _grpc_settings(fields: _Fields | None, mode: ListenerMode) -> GrpcSettings:
    if fields is None:
        return GrpcSettings()
    if mode is ListenerMode.TCP:
        raise ConfigError(fields.source, fields.path, "only for mode grpc or http")
    size = _int_range(0, 1 << 30)
    default = GrpcSettings()
    settings = GrpcSettings(
        max_request_message_bytes=fields.take(
            "max_request_message_bytes", size, default.max_request_message_bytes
        ),
        max_response_message_bytes=fields.take(
            "max_response_message_bytes", size, default.max_response_message_bytes
        ),
    )
    fields.done()
    return settings


PORT_PROTOCOLS = ("tcp", "http", "http1", "http2")


def _detection(fields: _Fields, kind: ListenerKind, mode: ListenerMode) -> dict:
    """How a mode-http listener picks a protocol per connection (pyproxy/http/detect.py)."""
    keys = [key for key in ("detect", "detect_timeout", "ports") if key in fields.data]
    if mode is ListenerMode.TCP:
        if keys:
            raise fields.error(keys[0], "only for mode http")
        return {}
    # Capture listeners see any protocol the app speaks: fall back to TCP; standalone is HTTP.
    default = "http" if kind is ListenerKind.STANDALONE else "auto"
    return {
        "detect": fields.take("detect", _choice(("auto", "http")), default),
        "detect_timeout": fields.take("detect_timeout", parse_duration, 0.1),
        "ports": fields.take("ports", _port_protocols, ()),
    }


def _port_protocols(value: Any) -> tuple[tuple[int, str], ...]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of port: protocol")
    out = []
    for port, protocol in value.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"expected a port 1..65535, got {port!r}")
        if protocol not in PORT_PROTOCOLS:
            raise ValueError(
                f"port {port}: must be one of {', '.join(PORT_PROTOCOLS)}, got {protocol!r}"
            )
        out.append((port, protocol))
    return tuple(sorted(out))


def _access_log_target(value: Any) -> str:
    if value in (None, False, "", "off"):
        return ""
    if not isinstance(value, str):
        raise ValueError("expected 'stdout', 'off' or a file path")
    return value


def _filters(fields: _Fields, mode: ListenerMode) -> tuple[FilterSpec, ...] | None:
    """`filters:` — a list of {name, type?, config}; each filter validates its own config."""
    items = fields.data.pop("filters", None)
    if items is None:
        return None
    # lazy: the filter machinery loads only for a config that has filters
    from pyproxy.chain.api import FilterConfigError
    from pyproxy.chain.registry import validate

    path = fields._join("filters")
    if not isinstance(items, list):
        raise ConfigError(fields.source, path, "expected a list of filters")
    specs: list[FilterSpec] = []
    for i, item in enumerate(items):
        entry = _Fields(fields.source, f"{path}[{i}]", item)
        name = entry.take("name", _name, None)
        if name is None:
            raise entry.error("name", "required")
        type_name = entry.take("type", _name, name)
        raw = entry.data.pop("config", None)
        entry.done()
        try:
            config = validate(type_name, raw, mode)
        except FilterConfigError as exc:
            where = f"{path}[{i}].config.{exc.field}" if exc.field else f"{path}[{i}]"
            raise ConfigError(fields.source, where, exc.reason) from None
        if any(spec.name == name for spec in specs):
            raise ConfigError(fields.source, f"{path}[{i}].name", f"duplicate filter name {name!r}")
        specs.append(FilterSpec(name, type_name, config))
    if len(specs) > MAX_FILTERS:
        raise ConfigError(fields.source, path, f"at most {MAX_FILTERS} filters per listener")
    return tuple(specs)


def _routes(fields: _Fields, mode: ListenerMode) -> tuple[RouteConfig, ...]:
    items = fields.data.pop("routes", None)
    if items is None:
        return ()
    path = fields._join("routes")
    if not isinstance(items, list):
        raise ConfigError(fields.source, path, "expected a list of routes")
    routes = []
    for i, item in enumerate(items):
        route = _Fields(fields.source, f"{path}[{i}]", item)
        match = route.nested("match")
        authority, prefix = "*", "/"
        if match is not None:
            authority = match.take("authority", _authority, "*")
            prefix = match.take("prefix", _prefix, "/")
            match.done()
        routes.append(
            RouteConfig(
                authority=authority,
                prefix=prefix,
                cluster=route.take("cluster", _name, ""),
                timeout=route.take("timeout", parse_duration, None),
                filters=_filters(route, mode),
                metadata=route.take("metadata", _metadata, {}),
                name=route.take("name", _route_name, ""),
                filter_context=route.take("filter_context", _metadata, {}),
            )
        )
        route.done()
    return tuple(routes)


def _metadata(value: Any) -> dict:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in value.items()
    ):
        raise ValueError("expected a mapping of filter name -> {key: value}")
    return value


def _route_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _authority(value: Any) -> str:
    if not isinstance(value, str) or not value or " " in value:
        raise ValueError("expected a host name like api.example.com, or *")
    return value.lower()


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("a path prefix starts with /")
    return value


def _clusters(source: str, data: Any) -> tuple[ClusterConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(source, "clusters", "expected a mapping of name -> cluster")
    clusters = []
    for name, item in data.items():
        fields = _Fields(source, f"clusters.{name}", item)
        try:
            _name(name)
        except ValueError as exc:
            raise ConfigError(source, f"clusters.{name}", str(exc)) from None
        endpoints = fields.take("endpoints", _address_list, None)
        if endpoints is None:
            raise fields.error("endpoints", "required")
        clusters.append(
            ClusterConfig(
                name=name,
                endpoints=endpoints,
                protocol=fields.take("protocol", _choice(("http1", "http2")), "http1"),
                idle_timeout=fields.take("idle_timeout", parse_duration, 4.0),
                connect_timeout=fields.take("connect_timeout", parse_duration, 5.0),
            )
        )
        fields.done()
    return tuple(clusters)


def build_config(data: Any, source: str = "<flags>") -> ProxyConfig:
    """Validate a parsed YAML document into a ProxyConfig (raises ConfigError)."""
    if data is None:
        data = {}
    top = _Fields(source, "", data)
    raw = dict(data)
    listeners_data = top.data.pop("listeners", None)
    if not isinstance(listeners_data, list) or not listeners_data:
        raise ConfigError(source, "listeners", "expected a non-empty list of listeners")
    listeners = tuple(
        _listener(_Fields(source, f"listeners[{i}]", item), i)
        for i, item in enumerate(listeners_data)
    )
    seen: dict[str, int] = {}
    for i, listener in enumerate(listeners):
        if listener.name in seen:
            raise ConfigError(source, f"listeners[{i}].name", f"duplicate name {listener.name!r}")
        seen[listener.name] = i
    bound: dict[Address, int] = {}
    for i, listener in enumerate(listeners):
        for address in listener.addresses:
            if address in bound and address.port != 0:
                raise ConfigError(
                    source,
                    f"listeners[{i}].address",
                    f"{address} is already used by listeners[{bound[address]}]",
                )
            bound[address] = i
    clusters = _clusters(source, top.data.pop("clusters", None))
    names = {cluster.name for cluster in clusters}
    for i, listener in enumerate(listeners):
        for j, route in enumerate(listener.routes):
            if route.cluster and route.cluster not in names:
                raise ConfigError(
                    source,
                    f"listeners[{i}].routes[{j}].cluster",
                    f"no cluster named {route.cluster!r}",
                )
            if listener.mode is ListenerMode.GRPC and route.cluster:
                cluster = next(c for c in clusters if c.name == route.cluster)
                if cluster.protocol != "http2":
                    raise ConfigError(
                        source,
                        f"listeners[{i}].routes[{j}].cluster",
                        f"cluster {route.cluster!r} speaks {cluster.protocol}; gRPC needs http2",
                    )
    config = ProxyConfig(
        listeners=listeners,
        clusters=clusters,
        admin=top.take("admin", _optional_address, parse_address(ADMIN_DEFAULT)),
        prometheus=top.take("prometheus", _optional_address, None),
        health=top.take("health", _optional_address, None),
        concurrency=top.take("concurrency", _int_range(1, 256), 1),
        stage_clock=top.take("stage_clock", _bool, True),
        drain_timeout=top.take("drain_timeout", parse_duration, 5.0),
        max_connections=top.take(
            "max_connections", _int_range(1, 1 << 20), MAX_CONNECTIONS_DEFAULT
        ),
        max_pending_requests=top.take(
            "max_pending_requests", _int_range(1, 1 << 20), MAX_PENDING_REQUESTS_DEFAULT
        ),
        allow_root=top.take("allow_root", _bool, False),
        source=source,
        raw=raw,
    )
    top.done()
    return config


def root_refusal(config: ProxyConfig, euid: int) -> str:
    """Why this config must not run as `euid` ("" if it may): capture listeners as root loop."""
    capture = [lst.name for lst in config.listeners if lst.kind is not ListenerKind.STANDALONE]
    if euid != 0 or not capture or config.allow_root:
        return ""
    return (
        f"refusing to run the sidecar as root (uid 0): listener(s) {', '.join(capture)} take "
        "captured traffic, and the capture rules exclude only the proxy's uid (1337 by default), "
        "so a root sidecar would capture its own upstream connections and send them back to "
        "itself. Run it as that uid (e.g. setpriv --reuid 1337 --regid 1337 --clear-groups "
        "pyproxy run ...), or pass --allow-root (config: allow_root: true) if your capture "
        "rules exclude uid 0 too."
    )


def load_config(path: str) -> ProxyConfig:
    import yaml  # a config file is YAML; flags-only runs never load the parser

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"invalid YAML: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            path, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}"
        ) from None
    return build_config(data, source=path)


def sidecar_listeners(mode: str, capture: str = "redirect") -> list[dict]:
    """The two capture listeners a Kubernetes sidecar runs (Istio's ports), for a capture mode."""
    transparent = capture == "tproxy"
    ipv6 = os.path.exists("/proc/net/if_inet6")

    def addresses(port: int) -> list[str]:
        return [f"0.0.0.0:{port}"] + ([f"[::]:{port}"] if ipv6 else [])

    return [
        {
            "name": "outbound",
            "kind": "outbound",
            "mode": mode,
            "addresses": addresses(OUTBOUND_PORT),
            "transparent": transparent,
            "original_dst": "ebpf" if capture == "ebpf" else "netfilter",
        },
        {
            "name": "inbound",
            "kind": "inbound",
            "mode": mode,
            "addresses": addresses(INBOUND_PORT),
            "inbound_source": INBOUND_SOURCE_V4,
            "inbound_source_v6": INBOUND_SOURCE_V6,
            "transparent": transparent,
        },
    ]
