"""Every fuzz target by name (the name is also its corpus folder)."""

from __future__ import annotations

from collections.abc import Callable

from fuzz import config_targets, grpc_targets, h2_native_targets, http1_targets, http2_targets

TARGETS: dict[str, Callable[[bytes], None]] = {
    "http1_request": http1_targets.http1_request,
    "http1_response": http1_targets.http1_response,
    "http1_roundtrip": http1_targets.http1_roundtrip,
    "native_scanner": http1_targets.native_scanner,
    "h2_frames": http2_targets.h2_frames,
    "h2_request": http2_targets.h2_request,
    "h2_response": http2_targets.h2_response,
    "h2_native_frames": h2_native_targets.h2_native_frames,
    "h2_native_request": h2_native_targets.h2_native_request,
    "h2_native_response": h2_native_targets.h2_native_response,
    "grpc_framing": grpc_targets.grpc_framing,
    "config_yaml": config_targets.config_yaml,
}
