"""Config target: any file is either a valid config or a ConfigError that names the field at
fault (or, for a file that is not YAML at all, the file); never another exception."""

from __future__ import annotations

import os
import tempfile

import yaml

from fuzz.draw import Draw
from pyproxy.config import ConfigError, load_config

# The field names config.py and the filters read, so structured documents reach deep.
_KEYS = (
    "listeners clusters admin prometheus health concurrency stage_clock drain_timeout name address "
    "addresses kind mode upstream app_side app_socket inbound_target inbound_source "
    "inbound_source_v6 transparent ipc write relay buffer_size http grpc codec max_header_bytes "
    "max_headers request_header_timeout idle_timeout server_timing access_log express_lane "
    "upstream_protocol max_concurrent_streams stream_window rapid_reset_max rapid_reset_window "
    "detect detect_timeout ports routes authority prefix cluster timeout filters type config "
    "endpoints protocol connect_timeout abort delay percentage http_status grpc_status "
    "fixed_delay token_bucket max_tokens tokens_per_fill fill_interval inline_code source_file "
    "path max_body_bytes match header exact present methods path_prefix max_instructions "
    "max_memory_bytes vm_config runtime configuration root_id fuel_per_call call_time_limit "
    "zerocopy_threshold"
).split()
_FILTER_TYPES = ["fault", "ratelimit", "tap", "lua", "wasm", "nope"]
_SCALARS = [
    None, True, False, 0, 1, -1, 65536, 2**70, 0.5, float("inf"), float("nan"), "", "x", "tcp",
    "http", "grpc", "inbound", "outbound", "standalone", "127.0.0.1:0", "[::1]:0", "unix:/tmp/s",
    "unix:/tmp/{port}", "10s", "1.5ms", "-1s", "h11", "fast", "off", "stdout", "/", "*",
    "a.example", "http2", "splice", "zerocopy", "uds", "return 1", "downstream", "\x00", "1e999",
]  # fmt: skip


def _value(draw: Draw, depth: int) -> object:
    kind = draw.below(8 if depth < 4 else 4)
    if kind < 4:
        return draw.pick(_SCALARS)
    if kind < 6:
        return [_value(draw, depth + 1) for _ in range(draw.below(3))]
    mapping: dict[object, object] = {}
    for _ in range(draw.below(5)):
        key = draw.pick(_KEYS) if draw.below(8) else draw.pick(_SCALARS)
        if key == "type":
            mapping[key] = draw.pick(_FILTER_TYPES)
        else:
            mapping[key] = _value(draw, depth + 1)
    return mapping


def _document(draw: Draw) -> bytes:
    listener = _value(draw, 2)
    if isinstance(listener, dict) and draw.flag():
        listener.update(name="l", address="127.0.0.1:0", upstream="127.0.0.1:1")
    top = _value(draw, 1)
    document = dict(top) if isinstance(top, dict) else {}
    document["listeners"] = [listener]
    return yaml.safe_dump(document, allow_unicode=True).encode("utf-8")


_PATH = os.path.join(tempfile.gettempdir(), f"pyproxy-fuzz-config-{os.getpid()}.yaml")


def config_yaml(data: bytes) -> None:
    """Half the inputs are raw bytes (any YAML, or none), half documents built from field names."""
    if not data:
        return
    text = data[1:] if data[0] & 1 else _document(Draw(data[1:]))
    with open(_PATH, "wb") as handle:
        handle.write(text)
    try:
        load_config(_PATH)
    except ConfigError as exc:
        assert exc.path or exc.reason.startswith(("invalid YAML", "cannot read")), repr(exc)
    finally:
        os.unlink(_PATH)
