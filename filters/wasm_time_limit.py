"""How long one entry into a Proxy-Wasm guest may run (the wasm filter's `call_time_limit`).

wasmtime's epoch interruption: compiled guest code compares the engine's epoch with its
store's deadline at function entries and loop heads, a load and a compare (fuel metering, the
alternative, counts every instruction and needs a host call to refill before each entry).
A ticker advances the epoch every TICK_MS: a thread of the native module, which never takes
the GIL, or, without the native module, a Python thread (and then the guest is entered with
the GIL released, so that thread can tick while a guest spins).

Each store's deadline is one tick away and stays so: when it passes while the guest runs,
wasmtime calls the store's deadline callback, which pushes it one tick on, unless the same
entry has already seen `limit` ticks pass: then the guest traps. The host bumps `entries`
as each entry begins (a Python integer, no C call), which is how the callback tells a
runaway entry from a new one that begins after the process was idle for some ticks. An
entry is thus stopped after running between `limit` and `limit + 1` ticks.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from ctypes import CFUNCTYPE, c_char_p, c_uint8, c_uint64, c_void_p
from typing import TYPE_CHECKING, Any

import wasmtime
from wasmtime import _bindings as _capi

from pyproxy import native

TICK_MS = 5
DEFAULT_CALL_TIME_LIMIT = 0.020
# With the native ticker the guest may keep the GIL while it runs (no Python thread needs it to
# stop a runaway); else the Python ticker must be able to run meanwhile.
NATIVE_TICKER = native.lib is not None

_dll = _capi.dll


class _EntryState:
    """native/wasm_call.c's EntryState without the native module: the same fields, plain
    attributes (set per instance once used)."""

    filter: Any = None
    host_calls = host_bytes = entries = 0


# The base of the Runtime and of its TimeLimit: an entry's state the native crossings keep as
# C fields (see native/wasm_call.c; its Python attributes read and write the same fields).
# The host's crossings into and out of wasmtime (native/wasm_call.c), used when the native
# module is: loaded here, once, so EntryState and the runtime's calls come from the same build.
WASMCALL = native.native_extension("_wasmcall") if NATIVE_TICKER else None
if TYPE_CHECKING:
    EntryState = _EntryState
else:
    EntryState = WASMCALL.EntryState if WASMCALL is not None else _EntryState


def _c(name: str, restype, *argtypes):
    address = ctypes.cast(getattr(_dll, name), c_void_p).value
    assert address, f"wasmtime's C API has no {name}"
    return CFUNCTYPE(restype, *argtypes)(address)


_DeadlineCallback = CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
_set_deadline_callback = _c(
    "wasmtime_store_epoch_deadline_callback", None, c_void_p, _DeadlineCallback, c_void_p, c_void_p
)
_engine_clone = _c("wasmtime_engine_clone", c_void_p, c_void_p)
_increment_epoch = _c("wasmtime_engine_increment_epoch", None, c_void_p)
_error_new = _c("wasmtime_error_new", c_void_p, c_char_p)
_UPDATE_DEADLINE_CONTINUE = 0


def start_ticker(engine: wasmtime.Engine) -> None:
    """Advance `engine`'s epoch every TICK_MS for as long as the process lives (its own engine
    handle, never freed, keeps the engine alive for the ticker)."""
    handle = _engine_clone(ctypes.cast(engine.ptr(), c_void_p).value)
    if NATIVE_TICKER:
        tick = ctypes.cast(_dll.wasmtime_engine_increment_epoch, c_void_p).value
        failed = native.lib.pp_ticker_start(tick, handle, TICK_MS)
        if failed:
            raise OSError(-failed, "cannot start the wasm epoch ticker thread")
        return

    def run() -> None:
        while True:
            time.sleep(TICK_MS / 1000)
            _increment_epoch(handle)

    threading.Thread(target=run, name="wasm-epoch-ticker", daemon=True).start()


def limit_ticks(seconds: float) -> int:
    """The ticks an entry may run for a call_time_limit (at least one)."""
    return max(1, math.ceil(seconds * 1000 / TICK_MS - 1e-9))


class TimeLimit(EntryState):
    """One runtime's bound on its entries; `arm` it on each new store. Its `entries` (an
    EntryState field) is bumped by the host as each entry begins."""

    __slots__ = ("limit", "_seen", "_ticks", "exceeded", "_callback")

    def __init__(self, seconds: float) -> None:
        self.limit = limit_ticks(seconds)
        self.entries = 0
        self._seen = -1  # `entries` when the deadline last passed
        self._ticks = 0  # ticks the entry `_seen` has seen pass
        self.exceeded = False  # an entry was stopped: the instance is replaced (arm clears it)
        self._callback = _DeadlineCallback(self._deadline)  # kept: wasmtime holds its address

    def arm(self, store: wasmtime.Store) -> None:
        self.exceeded = False
        store.set_epoch_deadline(1)
        store_ptr = ctypes.cast(store.ptr(), c_void_p).value
        _set_deadline_callback(store_ptr, self._callback, None, None)

    def _deadline(self, _context, _env, delta, kind) -> int | None:
        if self.entries != self._seen:
            self._seen, self._ticks = self.entries, 0
        else:
            self._ticks += 1
        if self._ticks >= self.limit:
            self.exceeded = True
            return _error_new(b"call_time_limit exceeded")
        c_uint64.from_address(delta).value = 1
        c_uint8.from_address(kind).value = _UPDATE_DEADLINE_CONTINUE
        return None
