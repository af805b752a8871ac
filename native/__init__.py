"""Native I/O module (cffi): splice relay, MSG_ZEROCOPY sends; optional, with pure-Python fallback.

The proxy's hot path calls the C functions directly through ``lib`` (one cffi
call, no Python wrapper in between); every function is non-blocking and
returns ``-errno`` instead of raising. ``ffi`` is exported for buffers
(``ffi.from_buffer``, ``ffi.new``).

``AVAILABLE`` says whether the compiled module loaded; when it did not,
``UNAVAILABLE_REASON`` says why and ``lib``/``ffi`` are None. Setting
``PYPROXY_DISABLE_NATIVE=1`` before import forces the fallback, so tests and
operators can run the pure-Python path on a host that has the module.

C API (see pyproxy_native.h for the full contract):

=====================================================  ==========================================
``pp_splice_in(sock_fd, pipe_wr, max) -> ssize_t``     >0 moved, 0 EOF, -EAGAIN would block
``pp_splice_out(pipe_rd, sock_fd, max) -> ssize_t``    >0 moved, -EAGAIN would block
``pp_pipe(int fds[2], size) -> int``                   capacity granted, or -errno
``pp_zc_enable(fd) -> int``                            0 or -errno (SO_ZEROCOPY)
``pp_zc_send(fd, buf, len) -> ssize_t``                bytes queued, -ENOBUFS: fall back to copy
``pp_zc_reap(fd, lo*, hi*, copied*, max) -> int``      notifications read, 0 none, -errno
``pp_send(fd, buf, len) -> ssize_t``                   plain MSG_DONTWAIT send
``pp_relay_copy(in, out, buf, len, sent*) -> ssize_t`` recv+send in one call
``pp_heap_trim() -> int``                              malloc_trim(0); 0 where libc has none
``pp_ticker_start(tick, engine, period_ms) -> int``     a thread calling tick(engine) every period
``pp_copy_step(struct pp_dir *)``                       a relay direction's readable step, whole
``pp_splice_step(struct pp_dir *)``                     the same through a pipe (splice)
=====================================================  ==========================================

The two steps are the event loop's readable callbacks themselves; they call
back ``pp_step_event(handle, status)`` (an ``extern "Python+C"`` function,
defined by pyproxy/io/relay_step.py) for anything but the plain step. The ticker advances the
wasm engine's epoch (filters/wasm_time_limit.py) without the GIL; ``_wasmcall``
(native/wasm_call.c) carries the wasm host's calls into and out of wasmtime.
"""

from __future__ import annotations

import errno as _errno
import importlib
import os as _os
from typing import Any

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "ffi",
    "lib",
    "EAGAIN",
    "ENOBUFS",
    "pipe",
    "http1_head_scanner",
    "express_pair",
    "native_extension",
    "effective_http2_codec",
    "heap_trim",
    "block_pointer",
]

# Negated once here so the hot path compares against a module constant.
EAGAIN = -_errno.EAGAIN
ENOBUFS = -_errno.ENOBUFS

ffi: Any = None
lib: Any = None
AVAILABLE: bool = False
UNAVAILABLE_REASON: str | None = None

if _os.environ.get("PYPROXY_DISABLE_NATIVE", "") not in ("", "0"):
    UNAVAILABLE_REASON = "disabled by PYPROXY_DISABLE_NATIVE"
else:
    try:
        from ._native import ffi, lib  # type: ignore[no-redef]
    except ImportError as exc:  # not built: no compiler at install time, or a foreign platform
        UNAVAILABLE_REASON = f"{type(exc).__name__}: {exc}"
    else:
        AVAILABLE = True


def http1_head_scanner() -> Any:
    """``_http1head.scan`` (see http1_head.c), or None: not built, or native code disabled."""
    return _extension("_http1head", "scan")


def express_pair() -> Any:
    """The ``_express`` module (see express_lane.c), or None: not built, or native code disabled."""
    return _extension("_express", None)


def native_extension(module: str) -> Any:
    """A cffi extension of this package other than _native (e.g. ``_h2``), or None."""
    return _extension(module, None)


def effective_http2_codec(choice: str) -> str:
    """The HTTP/2 codec a listener runs: native (libnghttp2) when asked for and built, else h2.

    Answered here, not by the codec module, so that reporting it (``/server_info``) does not
    load hyper-h2 into a proxy that has not seen an HTTP/2 connection yet."""
    return "native" if choice == "native" and native_extension("_h2") is not None else "h2"


def heap_trim() -> bool | None:
    """glibc's ``malloc_trim(0)`` through ``_native`` (no ctypes); None when the module is
    not loaded, False when the C library has no malloc_trim (e.g. musl)."""
    if lib is None:
        return None
    return bool(lib.pp_heap_trim())


def block_pointer(block: memoryview, via: Any) -> Any:
    """The address of a listener's counter block, for C, through the cffi module ``via``.

    Taken through a buffer export that is let go at once: the caller keeps the block (shared
    memory made before the workers fork) alive, and holding an export from a cdata inside
    reference cycles let the collector free the memoryview under it.
    """
    return via.cast("int64_t *", via.cast("uintptr_t", via.from_buffer(block)))


def _extension(module: str, name: str | None) -> Any:
    """A plain C extension of this package (or one of its names); None when it cannot be used."""
    if UNAVAILABLE_REASON == "disabled by PYPROXY_DISABLE_NATIVE":
        return None
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ImportError:
        return None
    return loaded if name is None else getattr(loaded, name)


def pipe(size: int = 0) -> tuple[int, int, int]:
    """Create a non-blocking pipe for a splice relay: (read_fd, write_fd, capacity).

    Called when a pipe pool needs another pipe, so it may raise; the per-chunk calls do not.
    """
    if lib is None:
        raise RuntimeError(f"pyproxy.native unavailable: {UNAVAILABLE_REASON}")
    fds = ffi.new("int[2]")
    cap = lib.pp_pipe(fds, size)
    if cap < 0:
        raise OSError(-cap, _os.strerror(-cap))
    return fds[0], fds[1], cap
