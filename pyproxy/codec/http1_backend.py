"""The HTTP/1 codec a configuration names: the fast backend (httptools/llhttp) or h11."""

from __future__ import annotations

from pyproxy.codec.http1 import DEFAULT_LIMITS, Http1Codec, Http1Limits, Role
from pyproxy.codec.http1_fast import FastHttp1Codec


def make_http1_codec(
    backend: str = "fast", role: Role = "server", limits: Http1Limits = DEFAULT_LIMITS
) -> Http1Codec:
    """Build a codec; ``fast`` (httptools/llhttp) is the default, ``h11`` the strict reference
    (a config's `codec:` names one; anything else is a ValueError)."""
    if backend == "fast":
        return FastHttp1Codec(role, limits)
    if backend == "h11":
        # lazy: h11 only where a config names it; the default backend never needs it.
        from pyproxy.codec.http1_h11 import H11Http1Codec

        return H11Http1Codec(role, limits)
    raise ValueError(f"unknown HTTP/1 codec backend {backend!r}")
