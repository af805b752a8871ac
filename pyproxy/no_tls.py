"""Keep OpenSSL out of a running proxy: pyproxy speaks no TLS itself.

asyncio and uvloop import ``ssl`` when they load, for TLS transports the proxy
never asks for; in an idle worker that is libcrypto, libssl and the ssl module,
about 4 MiB of RSS. ``pyproxy run`` calls ``load_event_loop_without_tls`` before
anything imports asyncio: asyncio loads as on a Python built without ssl (its
TLS transports refuse), uvloop loads against a stand-in whose TLS types match
nothing (an ``ssl=`` argument is refused). ``ssl`` itself stays importable:
whatever imports it later gets the real module.
"""

from __future__ import annotations

import sys
import types

# The OpenSSL error codes uvloop copies at import (SSL_ERROR_WANT_READ ... SYSCALL).
_ERROR_CODES = {"SSL_ERROR_WANT_READ": 2, "SSL_ERROR_WANT_WRITE": 3, "SSL_ERROR_SYSCALL": 5}
_TYPES = (
    "SSLContext",
    "MemoryBIO",
    "SSLError",
    "SSLWantReadError",
    "SSLSyscallError",
    "SSLZeroReturnError",
    "CertificateError",
)


class TLSUnavailable(RuntimeError):
    """A TLS facility was asked of a proxy process that loaded its event loop without TLS."""


def _no_context(*_args: object, **_kwargs: object) -> object:
    raise TLSUnavailable("pyproxy runs without TLS: the ssl module was not loaded")


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("ssl", "What uvloop reads from ssl at import, matching nothing.")
    for name in _TYPES:
        setattr(module, name, type(name, (TLSUnavailable,), {}))
    for name, code in _ERROR_CODES.items():
        setattr(module, name, code)
    module.create_default_context = _no_context  # type: ignore[attr-defined]
    return module


def load_event_loop_without_tls() -> bool:
    """Import asyncio and uvloop without ssl; False, changing nothing, when ssl or asyncio
    is already loaded."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return False
    try:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
        import asyncio  # noqa: F401  # lazy: loaded here, without ssl, before anything else does

        sys.modules["ssl"] = _stand_in()
        try:
            import uvloop  # noqa: F401  # lazy: the same, against the stand-in
        except ImportError:
            pass  # pyproxy.eventloop falls back to asyncio (or says uvloop is missing)
    finally:
        del sys.modules["ssl"]
    return True
