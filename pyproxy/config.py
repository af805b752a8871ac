"""Validate YAML (or flags) into immutable runtime config; every error names file, field and reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from pyproxy.addresses import Address, parse_address
from pyproxy.durations import parse_duration

MODES = ("tcp", "http", "grpc")
KINDS = ("standalone", "inbound", "outbound")
# Modes whose data path exists in this build; the others are refused at load time.
IMPLEMENTED_MODES = ("tcp",)

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_DEFAULT = "127.0.0.1:15000"
PROMETHEUS_DEFAULT = "0.0.0.0:15090"
HEALTH_DEFAULT = "0.0.0.0:15021"
# Source address for inbound deliveries, so capture rules can tell them from app traffic.
INBOUND_SOURCE_V4 = "127.0.0.6"
INBOUND_SOURCE_V6 = "::6"


class ConfigError(Exception):
    """A config that cannot be used: where it came from, which field, and why."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source, self.path, self.reason = source, path, reason
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    addresses: tuple[Address, ...]
    kind: str = "standalone"
    mode: str = "tcp"
    upstream: Address | None = None
    # Which side of this listener talks to the local application (its syscalls are `ipc`).
    app_side: str = "upstream"
    inbound_target: str = "127.0.0.1"
    inbound_source: str = ""
    inbound_source_v6: str = ""
    transparent: bool = False
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    buffer_size: int = 65536


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]
    admin: Address | None = None
    prometheus: Address | None = None
    health: Address | None = None
    concurrency: int = 1
    stage_clock: bool = True
    drain_timeout: float = 5.0
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
            raise self.error(key, "unknown field")


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return parse


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
    kind = fields.take("kind", _choice(KINDS), "standalone")
    mode = fields.take("mode", _choice(MODES), "tcp")
    if mode not in IMPLEMENTED_MODES:
        raise fields.error("mode", f"mode {mode!r} is not available in this build (have: tcp)")
    if "address" in fields.data and "addresses" in fields.data:
        raise fields.error("addresses", "give either address or addresses, not both")
    addresses = fields.take("addresses", _address_list, None)
    if addresses is None:
        address = fields.take("address", parse_address, None)
        if address is None:
            raise fields.error("address", "required")
        addresses = (address,)
    upstream = fields.take("upstream", parse_address, None)
    if kind == "standalone" and upstream is None:
        raise fields.error("upstream", "required for a standalone listener")
    if kind != "standalone" and upstream is not None:
        raise fields.error(
            "upstream", f"not used by an {kind} listener (it uses the original destination)"
        )
    default_app_side = "downstream" if kind == "outbound" else "upstream"
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
        connect_timeout=fields.take("connect_timeout", parse_duration, 5.0),
        idle_timeout=fields.take("idle_timeout", parse_duration, 3600.0),
        buffer_size=fields.take("buffer_size", _int_range(1024, 16 * 1024 * 1024), 65536),
    )
    fields.done()
    return listener


def _address_list(value: Any) -> tuple[Address, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of addresses")
    return tuple(parse_address(v) for v in value)


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
    config = ProxyConfig(
        listeners=listeners,
        admin=top.take("admin", _optional_address, parse_address(ADMIN_DEFAULT)),
        prometheus=top.take("prometheus", _optional_address, None),
        health=top.take("health", _optional_address, None),
        concurrency=top.take("concurrency", _int_range(1, 256), 1),
        stage_clock=top.take("stage_clock", _bool, True),
        drain_timeout=top.take("drain_timeout", parse_duration, 5.0),
        source=source,
        raw=raw,
    )
    top.done()
    return config


def load_config(path: str) -> ProxyConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            path, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}"
        ) from None
    return build_config(data, source=path)


def sidecar_listeners(mode: str, transparent: bool = False) -> list[dict]:
    """The two capture listeners a Kubernetes sidecar runs (Istio's ports)."""
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


def with_overrides(config: ProxyConfig, **changes: Any) -> ProxyConfig:
    return replace(config, **changes)
