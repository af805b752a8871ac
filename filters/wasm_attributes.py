"""Envoy's attributes as a Proxy-Wasm guest reads them (proxy_get_property): what each path names here.

A path is NUL-separated parts. The first names an attribute (README, Filters, lists those this
host knows); the rest select into it: a map's key, a message's field, a list's index, as
Envoy's host walks a CEL value. The value is then encoded as Envoy encodes it
(filters/wasm_encoding.py). Unknown attributes, and attributes not known yet (request.duration
before the request has ended, cluster_name before the upstream is chosen), are NOT_FOUND.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref
from typing import Any, Protocol

from pyproxy.filters.wasm_encoding import (
    Uint64,
    metadata_message,
    node_message,
    select,
    serialize,
)

from pyproxy.chain.api import socket_address
from pyproxy.node import local_node


class Runtime(Protocol):
    """What an attribute reads from the module's runtime: its plugin settings and the filter
    (the request or connection) the current callback serves, None between them."""

    settings: dict
    filter: Any


_REQUEST_PSEUDO = {
    b"path": b":path",
    b"method": b":method",
    b"host": b":authority",
    b"scheme": b":scheme",
}
_REQUEST_HEADER = {b"id": b"x-request-id", b"useragent": b"user-agent", b"referer": b"referer"}
# Envoy's listener_direction values (envoy.config.core.v3.TrafficDirection).
_DIRECTIONS = {"inbound": 1, "outbound": 2}
_XDS = frozenset((b"node", b"cluster_name", b"cluster_metadata", b"route_name", b"route_metadata"))
# pyproxy's response flags as Envoy's ResponseFlag bits (response.flags is their OR). DR, a
# downstream reset mid-exchange, is Envoy's DC (downstream connection termination).
FLAG_BITS = {
    "LR": 0x8,
    "UT": 0x4,
    "UR": 0x10,
    "UF": 0x20,
    "UC": 0x40,
    "UO": 0x80,
    "NR": 0x100,
    "DI": 0x200,
    "FI": 0x400,
    "RL": 0x800,
    "DC": 0x4000,
    "DR": 0x4000,
    "SI": 0x10000,
    "DPE": 0x40000,
    "DT": 0x400000,
    "UPE": 0x800000,
}
# response.code_details of a local reply, by its flag (Envoy's ResponseCodeDetails names).
FLAG_DETAILS = {
    "NR": "route_not_found",
    "UT": "upstream_response_timeout",
    "UF": "upstream_reset_before_response_started{connection_failure}",
    "UC": "upstream_reset_before_response_started{connection_termination}",
    "UR": "upstream_reset_before_response_started{remote_reset}",
    "UPE": "upstream_reset_before_response_started{protocol_error}",
    "UO": "overload_manager",
    "FI": "fault_filter_abort",
    "RL": "local_rate_limited",
    "DT": "request_header_timeout",
    "DPE": "http1.codec_error",
}

# connection.id: Envoy's is a process-wide counter. Each worker here is a process: its pid in
# the high 32 bits keeps ids unique across the workers, a counter of its own below.
_connection_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_counter = itertools.count(1)
_counter_pid = 0


def connection_id(sock) -> int:
    """The id of the connection on `sock`, the same for every request it carries."""
    global _counter, _counter_pid
    found = _connection_ids.get(sock)
    if found is None:
        pid = os.getpid()
        if pid != _counter_pid:  # a forked worker starts its own count
            _counter, _counter_pid = itertools.count(1), pid
        found = _connection_ids[sock] = (pid & 0xFFFFFFFF) << 32 | next(_counter)
    return found


def property_value(rt: Runtime, path: tuple[bytes, ...]) -> bytes | None:
    """The attribute at `path`, encoded as Envoy encodes it, or None (NOT_FOUND)."""
    if not path:
        return None
    f = rt.filter
    if f is not None and f.properties is not None:  # what proxy_set_property set
        value = f.properties.get(b".".join(path))
        if value is not None:
            return value
    value = _top(rt, path[0])
    for part in path[1:]:
        if value is None:
            return None
        value = _leaf(value, part)
    if value is None or callable(value):  # a whole attribute group is not sent
        return None
    return serialize(value)


def _leaf(value: Any, part: bytes) -> Any:
    if callable(value):  # an attribute group: each part computed only when asked for
        return value(part)
    return select(value, part)


def _top(rt: Runtime, name: bytes) -> Any:
    settings = rt.settings
    if name == b"plugin_name":
        return settings["name"]
    if name == b"plugin_root_id":
        return settings["root_id"]
    if name == b"plugin_vm_id":
        return settings["vm_id"]
    if name == b"node":
        node = local_node()
        return node_message(node.id, node.cluster, node.metadata)
    if name == b"xds":  # Envoy's newer names for the same attributes
        return lambda part: _top(rt, part) if part in _XDS else None
    f = rt.filter
    if f is None:
        return None
    if name == b"connection":
        return lambda part: _connection(f, part)
    if name in (b"source", b"destination"):
        return lambda part: _peer(f, name == b"source", part)
    if name == b"listener_direction":
        kind = str(getattr(f.listener(), "kind", ""))
        return _DIRECTIONS.get(kind, 0)
    exchange = getattr(f.callbacks, "exchange", None)
    if exchange is None:  # a TCP connection's context: no request, no route
        relay = getattr(f, "stream", None)
        if name == b"upstream" and relay is not None:
            return lambda part: _address(socket_address(relay.upstream, True), part)
        return None
    if name == b"request":
        return lambda part: _request(f, exchange, part)
    if name == b"response":
        return lambda part: _response(f, exchange, part)
    if name == b"upstream":
        return lambda part: _upstream(exchange, part)
    if name == b"metadata":
        return metadata_message(getattr(f.callbacks, "dynamic_metadata", None) or {})
    route = f.callbacks.current_route()
    if name == b"route_name":
        return route.name if route is not None else None
    if name == b"route_metadata":
        return metadata_message(route.metadata or {}) if route is not None else None
    if name in (b"cluster_name", b"cluster_metadata"):
        chosen = getattr(exchange, "target", None) or getattr(exchange, "upstream", None)
        if chosen is None or route is None:
            return None  # the upstream is not chosen yet (the native lane's pair has one)
        cluster = route.cluster or exchange.ctx.router.default_cluster
        if cluster is None:  # the original destination: no cluster
            return None
        # Clusters carry no metadata in pyproxy's config: an empty Metadata message.
        return cluster.name if name == b"cluster_name" else metadata_message({})
    return None


def _address(name, part: bytes) -> Any:
    if name is None:
        return None
    if isinstance(name, str):  # a Unix socket: an address, no port
        return name if part == b"address" else None
    host, port = name[0], name[1]
    if part == b"port":
        return port
    if part == b"address":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


def _peer(f, source: bool, part: bytes) -> Any:
    return _address(socket_address(f.downstream_socket(), source), part)


def _connection(f, part: bytes) -> Any:
    if part == b"mtls":
        return False  # pyproxy terminates no TLS
    if part == b"requested_server_name":
        return ""  # no TLS, so no SNI
    if part == b"id":
        sock = f.downstream_socket()
        return Uint64(connection_id(sock)) if sock is not None else None
    return None


def _upstream(exchange, part: bytes) -> Any:
    target = getattr(exchange, "target", None)
    if target is None:
        return None
    if part == b"address":
        return target.path or f"{target.host}:{target.port}"
    if part == b"port" and not target.path:
        return target.port
    return None


def _request(f, exchange, part: bytes) -> Any:
    # A module without a request-header callback still reads the request (as Envoy's do).
    request = f.request or f.callbacks.request_headers()
    if request is None:
        return _request_facts(f, exchange, part)
    if part == b"headers":
        return lambda name: request.get(name.lower())
    pseudo = _REQUEST_PSEUDO.get(part)
    if pseudo is not None:
        return request.get(pseudo)
    header = _REQUEST_HEADER.get(part)
    if header is not None:
        return request.get(header)
    target = request.get(b":path") or b""
    if part == b"url_path":
        return target.partition(b"?")[0]
    if part == b"query":
        return target.partition(b"?")[2]
    return _request_facts(f, exchange, part)


def _request_facts(f, exchange, part: bytes) -> Any:
    """What is known of a request besides its head: protocol, size, start, duration."""
    if part == b"protocol":
        return str(getattr(exchange.downstream, "protocol", "")) or None
    if part == b"size":
        return getattr(exchange, "bytes_in", 0)
    if part == b"time":
        started = f.started_ns or getattr(exchange, "started_ns", 0)
        if not started:
            return None
        return time.time_ns() - (time.perf_counter_ns() - started)
    if part == b"duration":
        # Envoy's: known once the request has completed (in proxy_on_log), as nanoseconds.
        if not f.started_ns or not f.ended_ns:
            return None
        return f.ended_ns - f.started_ns
    return None


def _response(f, exchange, part: bytes) -> Any:
    if part == b"flags":
        flag = getattr(exchange, "flag", "")
        return Uint64(FLAG_BITS.get(flag, 0))
    if part == b"code_details":
        if f.response is not None:  # the response the guest saw came from the upstream
            return "via_upstream"
        if f.reply_details:
            return f.reply_details
        return FLAG_DETAILS.get(getattr(exchange, "flag", ""))
    if part == b"size":
        return getattr(exchange, "bytes_out", 0)
    response = f.response
    if response is None:
        return None
    if part == b"code":
        status = response.get(b":status")
        return int(status) if status is not None and status.isdigit() else None
    if part == b"headers":
        return lambda name: response.get(name.lower())
    trailers = f.response_trailers
    if part == b"trailers":
        return None if trailers is None else (lambda name: trailers.get(name.lower()))
    if part == b"grpc_status":
        value = (trailers.get(b"grpc-status") if trailers is not None else None) or response.get(
            b"grpc-status"
        )
        return int(value) if value is not None and value.isdigit() else None
    return None
