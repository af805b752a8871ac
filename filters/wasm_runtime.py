"""The Proxy-Wasm runtime behind the wasm filter: one module instance in wasmtime, the host functions
it calls and the calls into it (filters/wasm.py is the filter; see its docstring for the config).

Host functions are ABI 0.2.1's as Envoy's host implements them (README, Filters, has the
table), and any env import outside the ABI is refused at load, by name. WASI is registered under both
`wasi_snapshot_preview1` and `wasi_unstable`, as Envoy does; beyond clocks, random, fd_write
(to the log) and proc_exit, WASI calls answer ENOSYS (`fd_*`: BADF, which ends wasi-libc's
preopen scan). `proxy_http_call`, `proxy_grpc_call` and `proxy_grpc_stream` go to a configured cluster (see
filters/callout.py) and answer on the root context (proxy_on_http_call_response, the
proxy_on_grpc_* callbacks), as in Envoy; shared queues wake proxy_on_queue_ready the same way.
Headers, bodies (during their body callback; Pause before the end buffers, as Envoy's
StopIterationAndBuffer) and trailers are exposed to the guest; on a TCP listener, the
connection's callbacks and data (filters/wasm_tcp.py). Attributes (proxy_get_property) are
filters/wasm_attributes.py's. The metadata callbacks are checked, never called: Envoy calls
them only for HTTP/2 METADATA frames, which pyproxy's codecs drop. Metrics it defines live in
shared memory (pyproxy/guest_metrics.py) and show in /stats under their own names.

Hot path: Python's `wasmtime.Func.__call__` costs ~65 µs (it re-reads the
function type and boxes every value), so host→guest calls go straight to the C
API (`wasmtime_func_call_unchecked`) with a preallocated argument buffer, keeping the GIL,
and host functions are raw unchecked callbacks that read and write guest memory through
one memoryview. Both crossings go through the native module's `_wasmcall` (C: no ctypes
conversions); without it, through ctypes, the same calls and the same host functions.
A request makes three entries (plus one per body chunk or trailer section a module has a
callback for): context create + request headers, response headers, and done + log +
delete, each pair or triple joined by a small trampoline module instantiated next to the
guest; proxy_log below the level never leaves wasm (LOG_SHIM). An entry (one hook's guest
calls) may run for `call_time_limit` (filters/wasm_time_limit.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import time
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    PYFUNCTYPE,
    c_char_p,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_void_p,
)
from functools import partial
from typing import Any, cast

import wasmtime
from pyproxy.filters.callout import GrpcResult, GrpcStream, grpc_call, http_call
from pyproxy.filters.wasm_attributes import property_value
from pyproxy.filters.wasm_encoding import deserialize_pairs, serialize_pairs
from pyproxy.filters.wasm_time_limit import (
    NATIVE_TICKER,
    WASMCALL,
    EntryState,
    TimeLimit,
    start_ticker,
)
from wasmtime import _bindings as _capi

from pyproxy.chain.api import (
    FilterConfigError,
    HeaderMap,
)
from pyproxy.guest_metrics import COUNTER as METRIC_COUNTER
from pyproxy.guest_metrics import GAUGE as METRIC_GAUGE
from pyproxy.guest_metrics import HISTOGRAM as METRIC_HISTOGRAM
from pyproxy.guest_metrics import SLOTS as METRIC_SLOTS
from pyproxy.guest_metrics import GuestMetrics

log = logging.getLogger("pyproxy.wasm")

# proxy_status_t
OK, NOT_FOUND, BAD_ARGUMENT, INVALID_MEMORY_ACCESS, UNIMPLEMENTED = 0, 1, 2, 6, 12
# wasi_errno_t
WASI_SUCCESS, WASI_BADF, WASI_FAULT, WASI_INVAL, WASI_NOSYS, WASI_NOTSUP = 0, 8, 21, 28, 52, 58
# proxy_map_type_t / proxy_buffer_type_t / proxy_stream_type_t
REQUEST_HEADERS, REQUEST_TRAILERS, RESPONSE_HEADERS, RESPONSE_TRAILERS = 0, 1, 2, 3
HTTP_CALL_RESPONSE_HEADERS, HTTP_CALL_RESPONSE_TRAILERS = 6, 7
HTTP_REQUEST_BODY, HTTP_RESPONSE_BODY = 0, 1
NETWORK_DOWNSTREAM_DATA, NETWORK_UPSTREAM_DATA = 2, 3
GRPC_INITIAL_METADATA, GRPC_TRAILING_METADATA, GRPC_RECEIVE_BUFFER = 4, 5, 5
HTTP_CALL_RESPONSE_BODY, VM_CONFIGURATION, PLUGIN_CONFIGURATION = 4, 6, 7
PAUSE = 1  # proxy_action_t

ABI_MARKERS = ("proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0", "proxy_abi_version_0_1_0")
# Envoy registers WASI under both names: the AssemblyScript SDK's runtime imports wasi_unstable.
WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")
MAX_HTTP_CALLS = 100  # callouts in flight per instance
MAX_QUEUES, MAX_QUEUE_ITEMS = 64, 1024
ROOT_CONTEXT_ID = 1
MAX_CONTEXT_ID = 0x7FFFFFFF  # stream context ids wrap around to ROOT_CONTEXT_ID + 1 past it
DEFAULT_MEMORY = 16 * 1024 * 1024
DEFAULT_PAUSE_TIMEOUT = 5.0
RESTART_BACKOFF = 1.0  # seconds between attempts to replace a failed instance
# The time limit bounds the guest's own run, and the host's work on its behalf only coarsely: a
# loop around a host call spends microseconds of Python per iteration, and whatever it hands
# the host (header values, log lines) is host memory outside the guest's cap. Per entry, a
# guest may make this many host calls and hand over this many bytes; past either it traps.
MAX_HOST_CALLS_PER_ENTRY = 10_000
MAX_HOST_BYTES_PER_ENTRY = 1024 * 1024
MAX_SHARED_DATA_BYTES = 16 * 1024 * 1024  # keys + values, per instance, across entries
WASI_IOV_MAX = 1024
# A request's guest calls that always come together, made from one host->guest entry through
# a small module that imports them (a wasm->wasm call costs nanoseconds, an entry ~0.9 µs).
STREAM_CALLBACKS = ("proxy_on_request_headers", "proxy_on_response_headers")
END_CALLBACKS = ("proxy_on_done", "proxy_on_log", "proxy_on_delete")

TRAPS, OVER_TIME_LIMIT, LOCAL_REPLIES, PAUSE_TIMEOUTS = range(4)
# The header edits whose plain case the native crossing does itself (native/wasm_call.c): an
# SDK's header filter makes one per header it adds or sets, each a Python call otherwise.
HEADER_EDITS = {"proxy_add_header_map_value": 1, "proxy_replace_header_map_value": 2}

# Proxy-Wasm log levels (trace..critical) to logging levels, and back.
LOG_LEVELS = (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
# SDK runtimes (AssemblyScript's, for one) call proxy_log at debug several times per hook without
# asking proxy_get_log_level. The guest's proxy_log is this shim, a wasm function in the guest's
# store: a line below the level drops there, without entering Python (an entry into a host
# function costs microseconds, a wasm-to-wasm call nanoseconds); as nothing reads a dropped line,
# its pointer is not checked. The rest goes on to the host's proxy_log. The level is the
# proxy's logging level when the instance starts.
LOG_SHIM_HOST = "pyproxy:host"
LOG_SHIM = """(module
  (import "pyproxy:host" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (global $min (export "min_level") (mut i32) (i32.const 0))
  (func (export "proxy_log") (param i32 i32 i32) (result i32)
    (if (i32.lt_u (local.get 0) (global.get $min)) (then (return (i32.const 0))))
    (call $log (local.get 0) (local.get 1) (local.get 2))))"""

# Callbacks the host calls, with their full (v0.2.1) parameter count and result count.
# A module may export fewer parameters (ABI v0.1.0 had no end_of_stream), never more.
CALLBACKS = {
    "proxy_on_memory_allocate": (1, 1),
    "malloc": (1, 1),
    "proxy_on_vm_start": (2, 1),
    "proxy_on_configure": (2, 1),
    "proxy_on_context_create": (2, 0),
    "proxy_on_request_headers": (3, 1),
    "proxy_on_response_headers": (3, 1),
    "proxy_on_request_body": (3, 1),
    "proxy_on_response_body": (3, 1),
    "proxy_on_request_trailers": (2, 1),
    "proxy_on_response_trailers": (2, 1),
    "proxy_on_done": (1, 1),
    "proxy_on_log": (1, 0),
    "proxy_on_delete": (1, 0),
    "proxy_on_tick": (1, 0),
    "proxy_on_http_call_response": (5, 0),
    "proxy_on_queue_ready": (2, 0),
    "proxy_on_grpc_receive_initial_metadata": (3, 0),
    "proxy_on_grpc_receive": (3, 0),
    "proxy_on_grpc_receive_trailing_metadata": (3, 0),
    "proxy_on_grpc_close": (3, 0),
    # TCP listeners (filters/wasm_tcp.py).
    "proxy_on_new_connection": (1, 1),
    "proxy_on_downstream_data": (3, 1),
    "proxy_on_upstream_data": (3, 1),
    "proxy_on_downstream_connection_close": (2, 0),
    "proxy_on_upstream_connection_close": (2, 0),
    # Checked, never called: Envoy calls them only for HTTP/2 METADATA frames, which its codec
    # drops unless allow_metadata is set, and pyproxy's codecs drop.
    "proxy_on_request_metadata": (2, 1),
    "proxy_on_response_metadata": (2, 1),
    "_initialize": (0, 0),
    "_start": (0, 0),
    "main": (2, 1),
}

# ---- the C API, typed for speed (plain ints for pointers: no ctypes object per call) -----------

_dll = _capi.dll


def _c(name: str, restype, *argtypes, keep_gil: bool = False):
    address = ctypes.cast(getattr(_dll, name), c_void_p).value
    assert address, f"wasmtime's C API has no {name}"
    return (PYFUNCTYPE if keep_gil else CFUNCTYPE)(restype, *argtypes)(address)


# The per-request calls keep the GIL: releasing and taking it back around each one (and again
# in each host callback the guest makes meanwhile) is pure cost on the event loop's thread,
# which is the only one that enters the guest; the native epoch ticker bounds how long a call
# can hold it. Without that ticker, the Python one needs the GIL while a guest runs.
_call_unchecked = _c(
    "wasmtime_func_call_unchecked", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p,
    keep_gil=NATIVE_TICKER,
)  # fmt: skip
_memory_data = _c("wasmtime_memory_data", c_void_p, c_void_p, c_void_p, keep_gil=True)
_memory_size = _c("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p, keep_gil=True)
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200
_trap_new = _c("wasmtime_trap_new", c_void_p, c_char_p, c_size_t)
_HostCallback = CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_size_t)
_define_unchecked = _c(
    "wasmtime_linker_define_func_unchecked",
    c_void_p,
    c_void_p,
    c_char_p,
    c_size_t,
    c_char_p,
    c_size_t,
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
)
_RAW = 16  # sizeof(wasmtime_val_raw_t)
_CALL_UNCHECKED = ctypes.cast(_dll.wasmtime_func_call_unchecked, c_void_p).value
# native/wasm_call.c; only where the guest may keep the GIL (the native ticker stops runaways).
_wasmcall = WASMCALL
if _wasmcall is not None:
    _wasmcall.init(ctypes.cast(_dll.wasmtime_trap_new, c_void_p).value)


def _enter_ctypes(ctx: int, args: int, faults: int, func: int, n: int, a: int, b: int, c: int):
    """_wasmcall.call's contract through ctypes: a, b, c as the first i32 arguments in the
    buffer at `args`, the first result as an i32, or None with the trap and the error left in
    the two pointer slots at `faults`."""
    raw = (c_int32 * 12).from_address(args)
    raw[0], raw[4], raw[8] = a, b, c
    slots = (c_void_p * 2).from_address(faults)
    slots[0] = None
    slots[1] = _call_unchecked(ctx, func, args, n, faults)
    if slots[0] or slots[1]:
        return None
    return raw[0]


def _enter_hook_ctypes(
    ctx: int, args: int, faults: int, rt: Runtime, time_limit: TimeLimit, context: Any,
    func: int, n: int, a: int, b: int, c: int,
) -> int | None:  # fmt: skip
    """_wasmcall.enter's contract: Runtime.begin(context), then _enter_ctypes' call (time_limit
    is the runtime's own, passed for the C form)."""
    rt.begin(context)
    return _enter_ctypes(ctx, args, faults, func, n, a, b, c)


# _enter(ctx, args, faults, func, n, a, b, c): a partial of the C call adds no Python frame (and
# a runtime's partial of this, holding its store's ctx and buffers, none either: Runtime.entry).
_enter = partial(_wasmcall.call, _CALL_UNCHECKED) if _wasmcall is not None else _enter_ctypes
# The same with a hook's entry begun first (Runtime.enter).
_enter_hook = (
    partial(_wasmcall.enter, _CALL_UNCHECKED) if _wasmcall is not None else _enter_hook_ctypes
)


def _addr(pointer) -> int:
    return ctypes.cast(pointer, c_void_p).value or 0


_engines: dict[int, wasmtime.Engine] = {}
# Guest instructions counted with fuel instead of time bounded by epochs: only for
# bench/wasm_cost.py's counting child (count_instructions), never in a proxy.
_fuel_metering = False


def engine() -> wasmtime.Engine:
    """One engine per process: a forked worker never touches the engine its parent compiled with
    (nor has its parent's epoch ticker: threads do not survive fork)."""
    pid = os.getpid()
    found = _engines.get(pid)
    if found is None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = _fuel_metering
        config.parallel_compilation = False  # no compiler threads in a process that forks
        # A memory never moves (Runtime.view relies on it): growing past the reservation fails.
        _capi.wasmtime_config_memory_may_move_set(config.ptr(), False)
        found = _engines[pid] = wasmtime.Engine(config)
        start_ticker(found)
    return found


def count_instructions() -> None:
    """Meter fuel in this process's engine (call before any module is compiled): each new store
    gets more fuel than any bench spends, so a bench can read guest instructions off it."""
    global _fuel_metering
    assert not _engines, "the engine exists already"
    _fuel_metering = True


class CompiledModule(str):
    """A compiled module inside a config: reads (and compares, and dumps) as its digest, pickles with its artifact."""

    artifact: bytes | bytearray

    def __new__(cls, digest: str, artifact: bytes | bytearray) -> CompiledModule:
        self = super().__new__(cls, digest)
        self.artifact = artifact
        return self

    def __reduce__(self):
        return (CompiledModule, (str(self), self.artifact))


class WasmFault(Exception):
    """The guest trapped, ran past call_time_limit, or a call into it failed."""

    def __init__(self, message: str, over_time_limit: bool = False) -> None:
        super().__init__(message)
        self.over_time_limit = over_time_limit


class _HostLimit(Exception):
    """The guest asked the host for more work or memory than one entry may use."""


class _ProcExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"proc_exit({code})")
        self.code = code


# ---- config ----------------------------------------------------------------------------------


def compile_module(field: str, code: str | bytes) -> wasmtime.Module:
    try:
        return wasmtime.Module(engine(), code)
    except wasmtime.WasmtimeError as exc:
        text = " ".join(str(exc).split())
        raise FilterConfigError(field, f"invalid module: {text[:200]}") from None


def check_module(field: str, module: wasmtime.Module) -> None:
    """Refuse modules this host cannot run: ABI version, memory, allocator, callback signatures, imports."""
    exports = {e.name: e.type for e in module.exports}
    markers = [name for name in exports if name.startswith("proxy_abi_version_")]
    if not markers:
        raise FilterConfigError(field, "not a Proxy-Wasm module (no proxy_abi_version_* export)")
    if not any(m in ABI_MARKERS for m in markers):
        raise FilterConfigError(
            field,
            f"unsupported Proxy-Wasm ABI {markers[0][len('proxy_abi_version_') :].replace('_', '.')}"
            " (supported: 0.2.1, 0.2.0, 0.1.0)",
        )
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise FilterConfigError(field, "the module exports no memory named `memory`")
    if "proxy_on_memory_allocate" not in exports and "malloc" not in exports:
        raise FilterConfigError(field, "the module exports no proxy_on_memory_allocate (or malloc)")
    for name, (nparams, nresults) in CALLBACKS.items():
        ty = exports.get(name)
        if ty is None:
            continue
        if not isinstance(ty, wasmtime.FuncType):
            raise FilterConfigError(field, f"export {name} is not a function")
        params, results = [str(t) for t in ty.params], [str(t) for t in ty.results]
        if (
            len(params) > nparams
            or any(p != "i32" for p in params)
            or len(results) != nresults
            or any(r != "i32" for r in results)
        ):
            raise FilterConfigError(
                field, f"export {name} has signature {params} -> {results}, not the ABI's"
            )
    for imp in module.imports:
        if imp.module != "env" and imp.module not in WASI_MODULES:
            raise FilterConfigError(
                field,
                f"imports {imp.module}.{imp.name}: only env, {' and '.join(WASI_MODULES)} exist",
            )
        if not isinstance(imp.type, wasmtime.FuncType):
            raise FilterConfigError(
                field, f"imports {imp.module}.{imp.name}, which is not a function (not provided)"
            )
        if imp.module == "env" and imp.name not in _env_functions():
            raise FilterConfigError(
                field, f"imports env.{imp.name}, a host function pyproxy does not provide"
            )


def _env_functions() -> frozenset[str]:
    """Every env.* name a module may import (any other is refused at load, by name)."""
    table = _host_functions(cast(Runtime, None))  # names only: no host function is called
    return frozenset(name for module, name in table if module == "env")


# ---- the runtime: one store and instance -----------------------------------------------------


class Runtime(EntryState):
    """One instance of a module (per worker per filter) and the host functions it calls. Its
    current context (`filter`) and entry budgets (`host_calls`, `host_bytes`) are EntryState
    fields, which the native crossings use directly."""

    def __init__(
        self,
        module: wasmtime.Module,
        settings: dict,
        loop=None,
        metrics: GuestMetrics | None = None,
    ) -> None:
        self.module = module
        self.settings = settings
        self.loop = loop
        self.name = settings["name"]
        self.time_limit = TimeLimit(settings["call_time_limit"])
        self.vm_config = settings["vm_configuration"].encode()
        self.plugin_config = settings["configuration"].encode()
        self.engine = engine()
        self.linker = wasmtime.Linker(self.engine)
        self._host_callbacks: list = []  # must outlive every store made from the linker
        self._link()
        self.generation = 0
        self.store: wasmtime.Store | None = None
        self.live: dict[int, Any] = {}  # context id -> its stream context
        # The context whose callback is running (a WasmFilter, or a WasmTcpFilter on a TCP
        # listener), None for the root context.
        self.filter: Any = None
        self.next_id = ROOT_CONTEXT_ID
        self.tick_timer = None
        self.tick_period = 0.0
        # proxy_define_metric's metrics: this worker's, shown in /stats (a private set when none given).
        self.guest_metrics = metrics if metrics is not None else GuestMetrics()
        self.shared: dict[bytes, tuple[bytes, int]] = {}
        self.shared_bytes = 0
        self.clusters: dict = {}  # name -> ClusterConfig, for proxy_http_call (set by the factory)
        self.calls: dict[int, tuple[Any, asyncio.Task]] = {}  # token -> caller, task
        self.streams: dict[int, GrpcStream] = {}  # proxy_grpc_stream's, by token
        self.next_token = 0
        self.call_response = None  # the HttpCallResult being delivered to the guest, or None
        # The gRPC call being delivered (its GrpcResult) and what of it the current callback
        # may read: "initial", "message", "trailing" or "close".
        self.grpc_answer: GrpcResult | None = None
        self.grpc_phase = ""
        self.queues: dict[bytes, list[bytes]] = {}  # name -> items; the token is the index + 1
        self.queue_names: list[bytes] = []
        self.failed_at = 0.0
        self.host_calls = self.host_bytes = 0  # this entry's, against the MAX_HOST_* limits
        self.trampoline = _trampoline_module(self.engine, module)
        self.start()

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Make a fresh store and instance, then run the module's start, VM start and configure."""
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.settings["max_memory_bytes"])
        self.time_limit.arm(store)
        if _fuel_metering:
            store.set_fuel(1 << 62)
        try:
            self._link_log_shim(store)
            instance = self.linker.instantiate(store, self.module)
        except wasmtime.WasmtimeError as exc:
            raise WasmFault(f"instantiation failed: {_first_line(exc)}") from None
        except wasmtime.Trap as exc:
            raise WasmFault(f"instantiation trapped: {_first_line(exc)}") from None
        self.generation += 1
        self.store, self.instance = store, instance
        self.ctx = _addr(store._context())
        self.view = memoryview(b"")  # over the guest's memory, widened as it grows (_grown)
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory), "checked at load"
        self.memory = memory
        self.memory_handle = ctypes.addressof(self.memory._memory)
        self.exports: dict[str, tuple[int, int]] = {}
        funcs = {}  # keep the Func objects (their handles are used by address)
        for name in CALLBACKS:
            func = exports.get(name) if hasattr(exports, "get") else None
            if func is None:
                try:
                    func = exports[name]
                except KeyError:
                    continue
            assert isinstance(func, wasmtime.Func), "callback signatures are checked at load"
            funcs[name] = func
            self.exports[name] = _handle(store, func)
        # Trampolines: "enter:<callback>" (context create + the callback) and "end" (done, log,
        # delete), made in this store from the guest's own functions.
        self.entering: dict[str, tuple[int, int]] = {}  # by the stream callback it joins
        self.ending: tuple[int, int] | None = None
        if self.trampoline is not None:
            module, imported = self.trampoline
            joined = wasmtime.Instance(store, module, [funcs[name] for name in imported])
            joined_exports = joined.exports(store)
            for name in [f"enter:{n}" for n in STREAM_CALLBACKS] + ["end"]:
                try:
                    func = joined_exports[name]
                except KeyError:
                    continue
                assert isinstance(func, wasmtime.Func)
                funcs[f"joined:{name}"] = func
                if name == "end":
                    self.ending = _handle(store, func)
                else:
                    self.entering[name.removeprefix("enter:")] = _handle(store, func)
        self._funcs = list(funcs.values())
        # One of the two exists: checked at load.
        self.alloc = self.exports.get("proxy_on_memory_allocate") or self.exports["malloc"]
        # Argument/result buffers: one for host→guest entries, one for allocations made from a host function.
        self.raw = (c_int32 * (4 * 8))()
        self.raw_addr = ctypes.addressof(self.raw)
        self.raw_alloc = (c_int32 * 12)()
        self.raw_alloc_addr = ctypes.addressof(self.raw_alloc)
        self.faults = (c_void_p * 2)()  # a failed call's trap and error (see _enter)
        self.faults_addr = ctypes.addressof(self.faults)
        # entry(func, n, a, b, c): an entry into this store, the result or None with the fault
        # left for _fault (call_raw raises it); entry_alloc the same for nested allocations.
        self.entry: Callable[..., int | None] = partial(
            _enter, self.ctx, self.raw_addr, self.faults_addr
        )
        self.entry_alloc = partial(_enter, self.ctx, self.raw_alloc_addr, self.faults_addr)
        # enter(context, func, n, a, b, c): begin(context), then entry(...) in one crossing.
        self.enter: Callable[..., int | None] = partial(
            _enter_hook, self.ctx, self.raw_addr, self.faults_addr, self, self.time_limit
        )
        self.live.clear()
        self.filter = None
        self._init_guest()

    def _init_guest(self) -> None:
        exports = self.exports
        self.new_entry()
        try:
            if "_initialize" in exports:
                self.call("_initialize")
                if "main" in exports:
                    self.call("main", 0, 0)
            elif "_start" in exports:
                self.call("_start")
        except WasmFault as exc:
            if "proc_exit(0)" not in str(exc):
                raise
        self.new_entry()
        if "proxy_on_context_create" in exports:
            self.call("proxy_on_context_create", ROOT_CONTEXT_ID, 0)
        if "proxy_on_vm_start" in exports:
            if not self.call("proxy_on_vm_start", ROOT_CONTEXT_ID, len(self.vm_config)):
                raise WasmFault("proxy_on_vm_start returned false")
        self.new_entry()
        if "proxy_on_configure" in exports:
            if not self.call("proxy_on_configure", ROOT_CONTEXT_ID, len(self.plugin_config)):
                raise WasmFault(
                    "proxy_on_configure returned false (plugin refused its configuration)"
                )

    def open(self, context: StreamContext) -> int:
        """A new stream context in the current instance (the store is up): its id, noted on
        it. No entry begins: the caller's enter (or begin) begins it."""
        self.next_id = context_id = (
            self.next_id + 1 if self.next_id < MAX_CONTEXT_ID else ROOT_CONTEXT_ID + 1
        )
        context.context_id = context_id
        context.generation = self.generation
        self.live[context_id] = context
        return context_id

    def new_entry(self) -> None:
        """An entry (one hook's guest calls) begins: its own time and host-work budgets."""
        self.time_limit.entries += 1
        self.host_calls = self.host_bytes = 0

    def begin(self, context: Any) -> None:
        """An entry for `context`'s hook begins: it is the current context (whose headers and
        body the host calls see), with new_entry's budgets. `enter` does this in its crossing."""
        self.filter = context
        self.new_entry()

    def charge(self, size: int) -> None:
        """Bytes the guest hands the host to keep or emit (headers, logs, shared data)."""
        self.host_bytes += size
        if self.host_bytes > MAX_HOST_BYTES_PER_ENTRY:
            raise _HostLimit(f"more than {MAX_HOST_BYTES_PER_ENTRY} bytes handed to the host")

    def close(self) -> None:
        if self.tick_timer is not None:
            self.tick_timer.cancel()
            self.tick_timer = None
        self.cancel_calls()
        self.live.clear()
        self.view = memoryview(b"")
        self.store = None

    def failed(self, exc: WasmFault, where: str, counters) -> None:
        """A trap: count it, log one line, and replace the instance (its memory may be inconsistent)."""
        counters[OVER_TIME_LIMIT if exc.over_time_limit else TRAPS] += 1
        log.warning("wasm filter %s: %s in %s; request answered 500", self.name, exc, where)
        for f in list(self.live.values()):
            f.orphaned()
        self.cancel_calls()
        self.restart()

    def restart(self) -> None:
        self.failed_at = time.monotonic()
        try:
            self.start()
        except WasmFault as exc:
            self.store = None
            log.error("wasm filter %s: could not restart the VM: %s", self.name, exc)

    def usable(self) -> bool:
        if self.store is not None:
            return True
        if time.monotonic() - self.failed_at >= RESTART_BACKOFF:
            self.restart()
        return self.store is not None

    # ---- host → guest -------------------------------------------------------------------

    def call(self, name: str, a: int = 0, b: int = 0, c: int = 0) -> int:
        """Call an export by name (start-up and rare paths); raises WasmFault."""
        func, n = self.exports[name]
        return self.call_raw(func, n, a, b, c)

    def call_raw(self, func: int, n: int, a: int = 0, b: int = 0, c: int = 0) -> int:
        result = self.entry(func, n, a, b, c)
        if result is None:
            raise self._fault()
        return result

    def _call_buffer(self, func: int, n: int) -> None:
        """Call with the arguments already in self.raw (more than three, or not i32s)."""
        faults = self.faults
        faults[0] = None
        faults[1] = _call_unchecked(self.ctx, func, self.raw_addr, n, self.faults_addr)
        if faults[0] or faults[1]:
            raise self._fault()

    def _fault(self) -> WasmFault:
        fault = self._taken_fault()
        if self.time_limit.exceeded:  # the deadline callback stopped the guest (a nested call too)
            ms = self.settings["call_time_limit"] * 1000
            return WasmFault(f"trap: ran past call_time_limit ({ms:g} ms)", True)
        return fault

    def _taken_fault(self) -> WasmFault:
        """The trap (or error) the failed call left, read and released."""
        faults = self.faults
        trap_ptr, error = faults[0], faults[1]
        faults[0] = faults[1] = None
        if trap_ptr:
            trap = wasmtime.Trap._from_ptr(ctypes.cast(trap_ptr, ctypes.POINTER(_capi.wasm_trap_t)))
            code = trap.trap_code
            if code is not None:  # e.g. "unreachable", "memory out of bounds"
                message = code.name.lower().replace("_", " ")
            else:  # a host function's trap (proc_exit, a failed nested call): its message
                message = " ".join(str(trap).split())[:200]
            return WasmFault(f"trap: {message}")
        assert error, "no trap, so the call returned an error"
        err = wasmtime.WasmtimeError._from_ptr(
            ctypes.cast(error, ctypes.POINTER(_capi.wasmtime_error_t))
        )
        return WasmFault(f"error: {_first_line(err)}")

    def _allocate(self, size: int) -> int:
        """Memory in the guest, from inside a host function (a caller's context is its store's)."""
        func, n = self.alloc
        result = self.entry_alloc(func, n, size, 0, 0)
        if result is None:
            raise self._fault()
        return result & 0xFFFFFFFF

    # ---- guest memory -------------------------------------------------------------------
    # Reads and writes go through one memoryview over the guest's linear memory, kept for the
    # store's life: the engine never moves a memory (memory_may_move is off, and a 32-bit
    # memory fits the default reservation) and a memory never shrinks, so the view only needs
    # widening (two C calls) when an access falls past its end because the guest grew it.

    def _grown(self, end: int) -> memoryview:
        """The view over the whole memory as it is now; IndexError if `end` is still past it."""
        ctx, handle = self.ctx, self.memory_handle
        size = _memory_size(ctx, handle)
        if end > size:
            raise IndexError
        self.view = view = _memory_view(_memory_data(ctx, handle), size, _PYBUF_WRITE)
        return view

    def check(self, ptr: int, size: int) -> None:
        """Raise IndexError (INVALID_MEMORY_ACCESS) unless [ptr, ptr + size) is guest memory."""
        if ptr + size > len(self.view):
            self._grown(ptr + size)

    def read(self, ptr: int, size: int) -> bytes:
        view = self.view
        end = ptr + size
        if end > len(view):
            view = self._grown(end)
        return bytes(view[ptr:end])

    def take_field(self, kptr: int, ksize: int, vptr: int, vsize: int) -> tuple[bytes, bytes]:
        """A header's name and value the guest hands over: charged (see charge), then read (one
        call for what a header edit needs, instead of three)."""
        self.host_bytes += ksize + vsize
        if self.host_bytes > MAX_HOST_BYTES_PER_ENTRY:
            raise _HostLimit(f"more than {MAX_HOST_BYTES_PER_ENTRY} bytes handed to the host")
        view = self.view
        kend, vend = kptr + ksize, vptr + vsize
        if kend > len(view) or vend > len(view):
            view = self._grown(max(kend, vend))
        return bytes(view[kptr:kend]), bytes(view[vptr:vend])

    def write(self, ptr: int, data: bytes) -> None:
        view = self.view
        end = ptr + len(data)
        if end > len(view):
            view = self._grown(end)
        view[ptr:end] = data

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, ptr: int, value: int) -> None:
        self.write(ptr, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def give(self, data: bytes, ret_ptr: int, ret_size: int) -> int:
        """Copy `data` into guest-allocated memory and return (pointer, size) through the out-params."""
        ptr = 0
        if data:
            ptr = self._allocate(len(data))
            if not ptr:
                return INVALID_MEMORY_ACCESS
            self.write(ptr, data)
        self.write_u32(ret_ptr, ptr)
        self.write_u32(ret_size, len(data))
        return OK

    # ---- linking ------------------------------------------------------------------------

    def _link(self) -> None:
        host = _host_functions(self)
        self.log_shim: wasmtime.Module | None = None
        for imp in self.module.imports:
            ty = imp.type
            # Checked at load: every import is a named function.
            assert isinstance(ty, wasmtime.FuncType) and imp.name is not None
            signature = ([str(t) for t in ty.params], [str(t) for t in ty.results])
            entry = host.get((imp.module, imp.name))
            module = imp.module
            edit = 0
            if entry is not None and (entry[0], entry[1]) == signature:
                impl = entry[2]
                if module == "env":
                    edit = HEADER_EDITS.get(imp.name, 0)
                # settings["log_shim"]: False only to measure the shim (bench/wasm_cost.py).
                if (module, imp.name) == ("env", "proxy_log") and self.settings.get(
                    "log_shim", True
                ):
                    # The guest gets the shim's proxy_log (see LOG_SHIM); the host's sits behind it.
                    module = LOG_SHIM_HOST
                    self.log_shim = wasmtime.Module(self.engine, LOG_SHIM)
                    self.linker.allow_shadowing = True
            else:
                impl = _stub(imp.module, imp.name, signature[1])
            self._define(module, imp.name, ty, signature, impl, edit)

    def _link_log_shim(self, store: wasmtime.Store) -> None:
        """This store's proxy_log: the shim, instantiated in it, with the current level."""
        if self.log_shim is None:
            return
        shim = self.linker.instantiate(store, self.log_shim)
        exports = shim.exports(store)
        level = exports["min_level"]
        assert isinstance(level, wasmtime.Global)
        level.set_value(store, wasmtime.Val.i32(_log_level()))
        self.linker.define(store, "env", "proxy_log", exports["proxy_log"])

    def _define(self, module: str, name: str, ty, signature, impl, edit: int = 0) -> None:
        """Link `impl` as module.name; `edit` (1 add, 2 replace): it is that header edit's
        implementation, whose plain case C may do (see native/wasm_call.c)."""
        params, results = signature
        result = results[0] if results else None
        runtime = self
        label = f"{module}.{name}"
        fault = WASI_FAULT if module != "env" else INVALID_MEMORY_ACCESS

        # The result (None without one), or the message of the trap to raise in the guest.
        # The caller's context is not asked for (a C call): in wasmtime's C API it is the
        # store's context, runtime.ctx, which nested calls into the guest use.
        def host(*values):
            runtime.host_calls += 1
            if runtime.host_calls > MAX_HOST_CALLS_PER_ENTRY:
                return f"more than {MAX_HOST_CALLS_PER_ENTRY} host calls in one entry".encode()
            try:
                return impl(*values)
            except IndexError:
                return fault
            except (WasmFault, _ProcExit, _HostLimit) as exc:  # a failed nested call unwinds too
                return str(exc).encode()
            except Exception as exc:  # a host bug must not take the proxy down: the guest traps
                log.exception("wasm filter %s: host function %s failed", runtime.name, label)
                return f"host function {label} failed: {exc}".encode()

        if _wasmcall is not None:
            kind = {"i32": ord("i"), "i64": ord("I"), None: 0}.get(result, ord("z"))
            kinds = "".join("I" if p == "i64" else "i" for p in params).encode()
            # The header edits' plain case is done in C, without entering Python (see
            # native/wasm_call.c): anything else still comes to `host`, which decides it.
            if edit:
                limits = (MAX_HOST_CALLS_PER_ENTRY, MAX_HOST_BYTES_PER_ENTRY)
                keep: Any = _wasmcall.HostFunc(host, kinds, kind, self, edit, limits)
            else:
                keep = _wasmcall.HostFunc(host, kinds, kind)
            callback, env = _wasmcall.trampoline(), keep.env
        else:
            keep = _HostCallback(_ctypes_callback(host, params, result))
            callback, env = _addr(keep), None
        self._host_callbacks.append(keep)
        m, n = module.encode(), name.encode()
        error = _define_unchecked(
            _addr(self.linker.ptr()), m, len(m), n, len(n), _addr(ty.ptr()), callback, env, None
        )
        if error:
            err = wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(error, ctypes.POINTER(_capi.wasmtime_error_t))
            )
            raise WasmFault(f"cannot link {label}: {err}")

    # ---- HTTP callouts (proxy_http_call) ---------------------------------------------------

    def dispatch_call(self, cluster, pairs, body: bytes, timeout: float) -> int:
        """Start a callout for the current context; returns its token (the answer comes later)."""
        self.next_token = token = self.next_token % 0x7FFFFFFF + 1
        caller = self.filter
        task = self.loop.create_task(http_call(cluster, pairs, body, timeout))
        self.calls[token] = (caller, task)
        generation = self.generation
        task.add_done_callback(lambda done: self._call_done(token, generation, done))
        return token

    def dispatch_grpc(self, cluster, path: bytes, metadata, message: bytes, timeout: float) -> int:
        """Start a unary gRPC call; its answer arrives on the root context, callback by callback."""
        self.next_token = token = self.next_token % 0x7FFFFFFF + 1
        task = self.loop.create_task(grpc_call(cluster, path, metadata, message, timeout))
        self.calls[token] = (self.filter, task)
        generation = self.generation
        task.add_done_callback(lambda done: self._grpc_done(token, generation, done))
        return token

    def _grpc_done(self, token: int, generation: int, task: asyncio.Task) -> None:
        """As Envoy's host: initial metadata, the message, trailing metadata, then close with the
        status; a failed call only closes. Each callback only if the module exports it."""
        entry = self.calls.pop(token, None)
        if entry is None or task.cancelled() or generation != self.generation or self.store is None:
            return
        answer: GrpcResult = task.result()
        steps: list[tuple[str, str, int]] = []
        if answer.status == 0 and answer.response is not None:
            steps = [
                ("proxy_on_grpc_receive_initial_metadata", "initial", len(answer.initial_metadata)),
                ("proxy_on_grpc_receive", "message", len(answer.response)),
                (
                    "proxy_on_grpc_receive_trailing_metadata",
                    "trailing",
                    len(answer.trailing_metadata),
                ),
            ]
        steps.append(("proxy_on_grpc_close", "close", answer.status))
        caller = entry[0]
        for name, phase, value in steps:
            if not self._grpc_callback(name, phase, answer, token, value, caller, generation):
                return
        if caller is not None and caller.reply is not None:
            caller._send_reply()

    def _grpc_callback(
        self, name: str, phase: str, answer: GrpcResult, token: int, value: int, caller, generation
    ) -> bool:
        """One proxy_on_grpc_* callback on the root context (if exported), with `answer` what
        its buffer, metadata and status read; False when the instance failed in it."""
        callback = self.exports.get(name)
        if callback is None or self.store is None or generation != self.generation:
            return generation == self.generation and self.store is not None
        self.grpc_answer, self.grpc_phase, self.filter = answer, phase, None
        try:
            self.new_entry()
            try:
                self.call_raw(callback[0], callback[1], ROOT_CONTEXT_ID, token, value)
            except WasmFault as exc:
                if caller is not None and caller.generation == self.generation:
                    caller._fault(exc, name)
                else:
                    self.failed(exc, name, [0] * 4)
                return False
            return True
        finally:
            self.grpc_answer, self.grpc_phase, self.filter = None, "", None

    # ---- gRPC streams (proxy_grpc_stream) ------------------------------------------------

    def open_grpc_stream(self, cluster, path: bytes, metadata) -> int:
        """Start a streaming call for the current context; its events arrive on the root context."""
        self.next_token = token = self.next_token % 0x7FFFFFFF + 1
        caller, generation = self.filter, self.generation

        def deliver(kind: str, value) -> None:
            self._grpc_stream_event(token, generation, caller, kind, value)

        self.streams[token] = GrpcStream(self.loop, cluster, path, metadata, deliver)
        return token

    def _grpc_stream_event(self, token: int, generation: int, caller, kind: str, value) -> None:
        """As Envoy's host: each event of a stream to its callback. After close the token is gone
        if the guest had closed its side, else it stays until proxy_grpc_close/cancel."""
        stream = self.streams.get(token)
        if stream is None:
            return
        if kind == "close" and stream.local_closed:
            del self.streams[token]
        if generation != self.generation or self.store is None:
            return
        if kind == "initial":
            answer = GrpcResult(0, b"", value, None, [])
            step = ("proxy_on_grpc_receive_initial_metadata", "initial", len(value))
        elif kind == "message":
            answer = GrpcResult(0, b"", [], value, [])
            step = ("proxy_on_grpc_receive", "message", len(value))
        elif kind == "trailing":
            answer = GrpcResult(0, b"", [], None, value)
            step = ("proxy_on_grpc_receive_trailing_metadata", "trailing", len(value))
        else:
            status, message = value
            answer = GrpcResult(status, message, [], None, [])
            step = ("proxy_on_grpc_close", "close", status)
        if self._grpc_callback(*step[:2], answer, token, step[2], caller, generation):
            if caller is not None and caller.reply is not None:
                caller._send_reply()

    def cancel_call(self, token: int) -> bool:
        """proxy_grpc_cancel (and close, for a unary call or a stream): drop a call in flight;
        its callbacks never come. Envoy's host: closing a stream half-closes it instead
        (close_stream), see proxy_grpc_close."""
        stream = self.streams.pop(token, None)
        if stream is not None:
            stream.cancel()
            return True
        entry = self.calls.pop(token, None)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    def cancel_calls(self, caller: Any = None) -> None:
        """Drop callouts: a stream's when it ends (nobody to resume), all when the instance goes.
        gRPC streams belong to the instance (the root context hears them): only it ends them."""
        for token, (owner, task) in list(self.calls.items()):
            if caller is None or owner is caller:
                del self.calls[token]
                task.cancel()
        if caller is None:
            for token in list(self.streams):
                self.streams.pop(token).cancel()

    def _call_done(self, token: int, generation: int, task: asyncio.Task) -> None:
        """Envoy's host calls proxy_on_http_call_response on the root context; an SDK sets the
        effective context to the stream that asked. A failed call arrives with no headers."""
        entry = self.calls.pop(token, None)
        if entry is None or task.cancelled() or generation != self.generation or self.store is None:
            return
        exc = task.exception()
        if exc is not None:
            log.info("wasm filter %s: http call %d failed: %s", self.name, token, exc)
            result = None
        else:
            result = task.result()
        callback = self.exports.get("proxy_on_http_call_response")
        if callback is None:
            return
        caller = entry[0]
        self.call_response = result
        self.filter = None
        self.new_entry()
        nheaders = len(result.headers) if result else 0
        ntrailers = len(result.trailers) if result else 0
        body_size = len(result.body) if result else 0
        try:
            self.call5(callback, ROOT_CONTEXT_ID, token, nheaders, body_size, ntrailers)
        except WasmFault as exc:
            if caller is not None and caller.generation == self.generation:
                caller._fault(exc, "proxy_on_http_call_response")
            else:
                self.failed(exc, "proxy_on_http_call_response", [0] * 4)
            return
        finally:
            self.call_response = None
            self.filter = None
        if caller is not None and caller.reply is not None:
            caller._send_reply()

    def call5(self, func: tuple[int, int], a: int, b: int, c: int, d: int, e: int) -> int:
        """A five-argument callback (proxy_on_http_call_response): rare, so no fast path."""
        raw = self.raw
        for i, value in enumerate((a, b, c, d, e)):
            raw[4 * i] = value
        self._call_buffer(func[0], func[1])
        return raw[0]

    # ---- shared queues ------------------------------------------------------------------

    def queue_ready(self, token: int) -> None:
        """proxy_on_queue_ready on the root context, after the enqueuing call has returned."""
        callback = self.exports.get("proxy_on_queue_ready")
        if callback is None or self.loop is None:
            return
        generation = self.generation

        def deliver() -> None:
            if self.store is None or generation != self.generation:
                return
            self.filter = None
            self.new_entry()
            try:
                self.call_raw(callback[0], callback[1], ROOT_CONTEXT_ID, token)
            except WasmFault as exc:
                log.warning("wasm filter %s: %s in proxy_on_queue_ready", self.name, exc)
                self.restart()

        self.loop.call_soon(deliver)

    # ---- ticks --------------------------------------------------------------------------

    def set_tick(self, ms: int) -> int:
        if self.tick_timer is not None:
            self.tick_timer.cancel()
            self.tick_timer = None
        self.tick_period = ms / 1000
        if ms and self.loop is not None and "proxy_on_tick" in self.exports:
            self.tick_timer = self.loop.call_later(self.tick_period, self._tick)
        return OK

    def _tick(self) -> None:
        self.tick_timer = None
        if self.store is None:
            return
        self.filter = None
        self.new_entry()
        try:
            self.call("proxy_on_tick", ROOT_CONTEXT_ID)
        except WasmFault as exc:
            log.warning("wasm filter %s: %s in proxy_on_tick", self.name, exc)
            self.restart()
            return
        if self.tick_period and self.tick_timer is None and self.store is not None:
            self.tick_timer = self.loop.call_later(self.tick_period, self._tick)


def _handle(store: wasmtime.Store, func: wasmtime.Func) -> tuple[int, int]:
    """(the function's handle address, the raw buffer slots a call needs) for call_raw."""
    ty = func.type(store)
    return ctypes.addressof(func._func), max(len(ty.params), len(ty.results), 1)


def _trampoline_module(
    engine: wasmtime.Engine, module: wasmtime.Module
) -> tuple[wasmtime.Module, list[str]] | None:
    """A module importing the guest's per-request callbacks and exporting them joined: one entry
    per hook instead of two or three. None when nothing can be joined (ABI counts checked at load)."""
    shapes = {
        e.name: (len(e.type.params), len(e.type.results))
        for e in module.exports
        if isinstance(e.type, wasmtime.FuncType)
    }
    imported: list[str] = []
    decls, bodies = [], []

    def declare(name: str) -> None:
        params, results = shapes[name]
        imported.append(name)
        decls.append(
            f'(import "guest" "{name}" (func ${name}'
            + " (param i32)" * params
            + " (result i32)" * results
            + "))"
        )

    def call(name: str, args: list[str]) -> str:
        params, results = shapes[name]
        text = f"(call ${name} {' '.join(args[:params])})"
        return f"(drop {text})" if results else text

    create = "proxy_on_context_create"
    if create in shapes:
        for name in STREAM_CALLBACKS:
            params = shapes.get(name, (0, 0))[0]
            if not params:
                continue  # no context id to create with: called the plain way
            if create not in imported:
                declare(create)
            declare(name)
            args = [f"(local.get {i})" for i in range(params)]
            bodies.append(
                f'(func (export "enter:{name}")'
                + " (param i32)" * params
                + " (result i32)"
                + call(create, ["(local.get 0)", f"(i32.const {ROOT_CONTEXT_ID})"])
                + f"(call ${name} {' '.join(args)}))"
            )
    ending = [name for name in END_CALLBACKS if name in shapes]
    if len(ending) > 1:
        for name in ending:
            declare(name)
        bodies.append(
            '(func (export "end") (param i32) '
            + " ".join(call(name, ["(local.get 0)"]) for name in ending)
            + ")"
        )
    if not bodies:
        return None
    return wasmtime.Module(engine, "(module " + " ".join(decls + bodies) + ")"), imported


def _grpc_cluster(service: bytes) -> str:
    """The cluster a proxy_grpc_call names: a serialized GrpcService's envoy_grpc.cluster_name
    (field 1, inside field 1), else the bytes themselves as a name."""
    inner = _proto_field(service, 1)
    name = _proto_field(inner, 1) if inner is not None else None
    return (name if name is not None else service).decode(errors="replace")


def _grpc_target(service: bytes, method: bytes, metadata: bytes):
    """(path, metadata pairs) of a gRPC call the guest asked for, or None if malformed."""
    if not service or not method or b"/" in service or b"/" in method:
        return None
    try:
        pairs = deserialize_pairs(metadata)
    except (ValueError, struct.error):
        return None
    if any(k[:1] == b":" or not k for k, _ in pairs):
        return None
    return b"/" + service + b"/" + method, pairs


def _proto_field(data: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a protobuf message, if data parses as one
    made only of such fields (anything else: None)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key is None or key & 7 != 2:
            return None
        size, pos = _varint(data, pos)
        if size is None or pos + size > len(data):
            return None
        if key >> 3 == number:
            return data[pos : pos + size]
        pos += size
    return None


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


def _log_level() -> int:
    """The lowest Proxy-Wasm log level the proxy's logging lets through (5: critical only)."""
    effective = log.getEffectiveLevel()
    return next((i for i, lv in enumerate(LOG_LEVELS) if lv >= effective), 5)


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong: wasmtime puts a host trap's reason under "Caused by:"."""
    text = str(exc).strip()
    head, _, cause = text.partition("Caused by:")
    lines = cause.strip().splitlines() or head.strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _ctypes_callback(host, params: list[str], result: str | None):
    """A ctypes host callback around `host` (see Runtime._define), as native/wasm_call.c's."""
    unpack = struct.Struct(
        "<" + "".join("q8x" if p == "i64" else "I12x" for p in params)
    ).unpack_from
    size = _RAW * len(params)

    def callback(_env, _caller, args, _nargs):
        value = host(*unpack(ctypes.string_at(args, size))) if params else host()
        if value.__class__ is bytes:
            return _trap_new(value, len(value))
        if result == "i32":
            c_uint32.from_address(args).value = value & 0xFFFFFFFF
        elif result == "i64":
            c_int64.from_address(args).value = value
        elif result is not None:
            ctypes.memset(args, 0, _RAW)
        return None

    return callback


def _stub(module: str, name: str, results: list[str]):
    if module == "env":
        answer = UNIMPLEMENTED
    elif name.startswith("fd_"):
        answer = WASI_BADF
    else:
        answer = WASI_NOSYS

    def stub(*_args) -> int | None:
        return answer if results else None

    return stub


# ---- host functions --------------------------------------------------------------------------


def _host_functions(rt: Runtime) -> dict:
    """(module, name) -> (param types, result types, implementation), per the v0.2.1 spec."""
    I, L = "i32", "i64"  # noqa: E741

    def headers_of(map_id: int):
        if map_id == REQUEST_HEADERS or map_id == RESPONSE_HEADERS:  # the usual: first
            f = rt.filter
            if f is None:
                return None
            return f.request if map_id == REQUEST_HEADERS else f.response
        if map_id == GRPC_INITIAL_METADATA or map_id == GRPC_TRAILING_METADATA:
            grpc_answer = rt.grpc_answer
            if grpc_answer is None:
                return None
            if map_id == GRPC_INITIAL_METADATA:
                return HeaderMap(list(grpc_answer.initial_metadata), {})
            return HeaderMap(list(grpc_answer.trailing_metadata), {})
        if map_id == HTTP_CALL_RESPONSE_HEADERS or map_id == HTTP_CALL_RESPONSE_TRAILERS:
            answer = rt.call_response
            if answer is None:
                return None
            pairs = answer.headers if map_id == HTTP_CALL_RESPONSE_HEADERS else answer.trailers
            return HeaderMap(
                [p for p in pairs if p[0][:1] != b":"], dict(p for p in pairs if p[0][:1] == b":")
            )
        f = rt.filter
        if f is None:
            return None
        if map_id == REQUEST_TRAILERS:
            return f.request_trailers
        if map_id == RESPONSE_TRAILERS:
            return f.response_trailers
        return None

    def known_map(map_id: int) -> bool:
        return 0 <= map_id <= 7

    def proxy_log(level, ptr, size):
        if level > 5:
            return BAD_ARGUMENT
        py_level = LOG_LEVELS[level]
        if not log.isEnabledFor(py_level):
            # Below the level the shim had when the instance started (the level has risen
            # since): dropped, only bounds-checked.
            rt.check(ptr, size)
            return OK
        rt.charge(size)
        message = rt.read(ptr, size)
        log.log(py_level, "wasm filter %s: %s", rt.name, message.decode(errors="replace"))
        return OK

    def proxy_get_log_level(ret):
        rt.write_u32(ret, _log_level())
        return OK

    def proxy_get_current_time_nanoseconds(ret):
        rt.write_u64(ret, time.time_ns())
        return OK

    def buffer_of(buffer_id: int) -> bytes | bytearray | None:
        if buffer_id <= NETWORK_UPSTREAM_DATA:
            f = rt.filter
            if f is None or f.body_stream != buffer_id:
                return None  # a body (or TCP data) is the guest's only during its own callback
            return f.guest_body()
        if buffer_id == VM_CONFIGURATION:
            return rt.vm_config
        if buffer_id == PLUGIN_CONFIGURATION:
            return rt.plugin_config
        if buffer_id == HTTP_CALL_RESPONSE_BODY and rt.call_response is not None:
            return rt.call_response.body
        if buffer_id == GRPC_RECEIVE_BUFFER and rt.grpc_phase == "message":
            assert rt.grpc_answer is not None, "set with the phase"
            return rt.grpc_answer.response
        return None

    def proxy_get_buffer_bytes(buffer_id, start, max_size, ret_ptr, ret_size):
        data = buffer_of(buffer_id)
        if data is None:
            return NOT_FOUND if 0 <= buffer_id <= 8 else BAD_ARGUMENT
        if start > len(data):
            return BAD_ARGUMENT
        chunk = bytes(data[start : start + max_size])
        if not chunk:  # as Envoy's host: nothing to copy, the out-params are left alone
            return OK
        return rt.give(chunk, ret_ptr, ret_size)

    def proxy_get_buffer_status(buffer_id, ret_size, ret_flags):
        data = buffer_of(buffer_id)
        if data is None:
            return NOT_FOUND if 0 <= buffer_id <= 8 else BAD_ARGUMENT
        rt.write_u32(ret_size, len(data))
        rt.write_u32(ret_flags, 0)
        return OK

    def proxy_set_buffer_bytes(buffer_id, start, length, ptr, size):
        """Envoy's rule, made whole: bytes [start, start + length) of the buffer become the data
        (start 0 with length 0 prepends; a start at or past the end appends). Only the body
        being delivered to the guest can be written."""
        if not 0 <= buffer_id <= 8:
            return BAD_ARGUMENT
        f = rt.filter
        if buffer_id > NETWORK_UPSTREAM_DATA or f is None:
            return NOT_FOUND if buffer_id <= NETWORK_UPSTREAM_DATA else BAD_ARGUMENT
        if f.body_stream != buffer_id:
            return NOT_FOUND
        body = f.guest_body()
        rt.charge(size)
        data = rt.read(ptr, size)
        replaced = 0 if start >= len(body) else min(length, len(body) - start)
        if replaced != size and buffer_id <= HTTP_RESPONSE_BODY:
            headers = f.request if buffer_id == HTTP_REQUEST_BODY else f.response
            if headers is not None and headers.get(b"content-length") is not None:
                # The head carrying that length has gone (or will go) as it is: a body of
                # another length would break the message's framing. Remove content-length
                # in the headers callback first, as the SDKs' body examples do.
                return BAD_ARGUMENT
        if start >= len(body):
            body += data
        else:
            body[start : start + length] = data
        f.body_changed = True
        return OK

    def proxy_get_configuration(ret_ptr, ret_size):  # ABI v0.1.0
        return rt.give(rt.plugin_config, ret_ptr, ret_size)

    def proxy_get_header_map_value(map_id, kptr, ksize, ret_ptr, ret_size):
        if not known_map(map_id):
            return BAD_ARGUMENT
        headers = headers_of(map_id)
        if headers is None:
            return NOT_FOUND
        value = headers.get(rt.read(kptr, ksize))
        if value is None:
            return NOT_FOUND
        return rt.give(value, ret_ptr, ret_size)

    def edited(map_id: int):
        """The header map an edit names (the request's or response's first, with no call), or
        the status to answer (an unknown map, or one the context has not got)."""
        f = rt.filter
        if map_id == REQUEST_HEADERS and f is not None:
            headers = f.request
        elif map_id == RESPONSE_HEADERS and f is not None:
            headers = f.response
        elif not known_map(map_id):
            return BAD_ARGUMENT
        else:
            headers = headers_of(map_id)
        return NOT_FOUND if headers is None else headers

    def edit(map_id, kptr, ksize, vptr, vsize, replace: bool) -> int:
        headers = edited(map_id)
        if headers.__class__ is int:
            return headers
        try:
            if replace:
                headers.set(*rt.take_field(kptr, ksize, vptr, vsize))
            else:
                headers.add(*rt.take_field(kptr, ksize, vptr, vsize))
        except ValueError:  # a CR/LF or bad name: refused, never smuggled onto the wire
            return BAD_ARGUMENT
        return OK

    def proxy_add_header_map_value(map_id, kptr, ksize, vptr, vsize):
        return edit(map_id, kptr, ksize, vptr, vsize, False)

    def proxy_replace_header_map_value(map_id, kptr, ksize, vptr, vsize):
        return edit(map_id, kptr, ksize, vptr, vsize, True)

    def proxy_remove_header_map_value(map_id, kptr, ksize):
        headers = edited(map_id)
        if headers.__class__ is int:
            return headers
        headers.remove(rt.take_field(kptr, ksize, 0, 0)[0])
        return OK

    def proxy_get_header_map_pairs(map_id, ret_ptr, ret_size):
        if not known_map(map_id):
            return BAD_ARGUMENT
        headers = headers_of(map_id)
        pairs = headers.items() if headers is not None else []
        return rt.give(serialize_pairs(pairs), ret_ptr, ret_size)

    def proxy_get_header_map_size(map_id, ret_size):
        if not known_map(map_id):
            return BAD_ARGUMENT
        headers = headers_of(map_id)
        pairs = headers.items() if headers is not None else []
        rt.write_u32(ret_size, len(serialize_pairs(pairs)))
        return OK

    def proxy_set_header_map_pairs(map_id, ptr, size):
        if not known_map(map_id):
            return BAD_ARGUMENT
        headers = headers_of(map_id)
        if headers is None:
            return NOT_FOUND
        rt.charge(size)
        try:
            pairs = deserialize_pairs(rt.read(ptr, size))
        except (ValueError, struct.error):
            return BAD_ARGUMENT
        try:
            for name in {k for k, _ in headers.headers}:
                headers.remove(name)
            for key, value in pairs:
                if key[:1] == b":":
                    headers.set(key, value)
                else:
                    headers.add(key, value)
        except ValueError:
            return BAD_ARGUMENT
        return OK

    def proxy_send_local_response(status, dptr, dsize, bptr, bsize, hptr, hsize, grpc_status):
        f = rt.filter
        if f is None:
            return NOT_FOUND
        try:
            headers = deserialize_pairs(rt.read(hptr, hsize))
        except (ValueError, struct.error):
            return BAD_ARGUMENT
        grpc = grpc_status if 0 <= grpc_status <= 16 else None
        if not 100 <= status <= 999:
            return BAD_ARGUMENT
        # Sent after the guest returns: answering now could end the request (and call the guest) mid-call.
        f.reply = (status, rt.read(bptr, bsize), headers, grpc, rt.read(dptr, dsize))
        return OK

    def proxy_get_property(pptr, psize, ret_ptr, ret_size):
        path = tuple(p for p in rt.read(pptr, psize).split(b"\0") if p)
        value = property_value(rt, path)
        if value is None:
            return NOT_FOUND
        return rt.give(value, ret_ptr, ret_size)

    def proxy_set_effective_context(context_id):
        if context_id == ROOT_CONTEXT_ID:
            rt.filter = None
            return OK
        f = rt.live.get(context_id)
        if f is None:
            return BAD_ARGUMENT
        rt.filter = f
        return OK

    def continue_stream(stream_type):
        f = rt.filter
        if f is None or stream_type > 3:
            return BAD_ARGUMENT
        return f.continue_stream(stream_type)

    def proxy_close_stream(stream_type):
        """Envoy's: the request or response stream is reset once the guest returns (response
        code details "wasm_close_stream"); downstream or upstream closes a TCP connection, a
        no-op in an HTTP context, as a request or response is in a TCP one."""
        if not 0 <= stream_type <= 3:
            return BAD_ARGUMENT
        f = rt.filter
        if f is not None:
            f.close_stream(stream_type)
        return OK

    def proxy_continue_request():  # ABI v0.1.0
        return continue_stream(0)

    def proxy_continue_response():  # ABI v0.1.0
        return continue_stream(1)

    def proxy_done():
        return NOT_FOUND  # contexts are never kept pending here

    def proxy_set_tick_period_milliseconds(ms):
        return rt.set_tick(ms)

    def proxy_http_call(uptr, usize, hptr, hsize, bptr, bsize, tptr, tsize, timeout_ms, ret_token):
        """Envoy: `upstream` names a cluster; headers need :method, :path and :authority."""
        cluster = rt.clusters.get(rt.read(uptr, usize).decode(errors="replace"))
        if cluster is None or rt.loop is None:
            return BAD_ARGUMENT
        if len(rt.calls) >= MAX_HTTP_CALLS:
            return BAD_ARGUMENT
        rt.charge(hsize + bsize + tsize)
        try:
            pairs = deserialize_pairs(rt.read(hptr, hsize))
        except (ValueError, struct.error):
            return BAD_ARGUMENT
        names = {k for k, _ in pairs}
        if not {b":method", b":path", b":authority"} <= names:
            return BAD_ARGUMENT
        token = rt.dispatch_call(cluster, pairs, rt.read(bptr, bsize), timeout_ms / 1000)
        rt.write_u32(ret_token, token)
        return OK

    def metric_slot(metric_id: int) -> int:
        """The slot behind an id this worker handed out (id = slot + 1), or -1."""
        slot = metric_id - 1
        if not 0 <= slot < METRIC_SLOTS or rt.guest_metrics.kind(slot) < 0:
            return -1
        return slot

    def proxy_grpc_call(
        sptr, ssize, nptr, nsize, mptr, msize, hptr, hsize, rptr, rsize, timeout_ms, ret_token
    ):
        """Envoy: the service is a GrpcService (its envoy_grpc.cluster_name is used) or, failing
        that, a cluster name; a unary call of `service_name`/`method_name`."""
        cluster = rt.clusters.get(_grpc_cluster(rt.read(sptr, ssize)))
        if cluster is None or rt.loop is None or len(rt.calls) >= MAX_HTTP_CALLS:
            return BAD_ARGUMENT
        rt.charge(nsize + msize + hsize + rsize)
        call = _grpc_target(rt.read(nptr, nsize), rt.read(mptr, msize), rt.read(hptr, hsize))
        if call is None:
            return BAD_ARGUMENT
        path, metadata = call
        token = rt.dispatch_grpc(cluster, path, metadata, rt.read(rptr, rsize), timeout_ms / 1000)
        rt.write_u32(ret_token, token)
        return OK

    def proxy_grpc_cancel(token):
        return OK if rt.cancel_call(token) else NOT_FOUND

    def proxy_grpc_close(token):
        """Envoy: a stream is half-closed (its answer still comes); a unary call is cancelled."""
        stream = rt.streams.get(token)
        if stream is None:
            return proxy_grpc_cancel(token)
        if stream.done:  # the server closed it first: its callbacks have all come
            del rt.streams[token]
        stream.close()
        return OK

    def proxy_grpc_stream(sptr, ssize, nptr, nsize, mptr, msize, hptr, hsize, ret_token):
        """A streaming call of `service_name`/`method_name` with initial metadata (ABI 0.2.1);
        the service as for proxy_grpc_call."""
        cluster = rt.clusters.get(_grpc_cluster(rt.read(sptr, ssize)))
        if cluster is None or rt.loop is None or len(rt.streams) >= MAX_HTTP_CALLS:
            return BAD_ARGUMENT
        rt.charge(nsize + msize + hsize)
        call = _grpc_target(rt.read(nptr, nsize), rt.read(mptr, msize), rt.read(hptr, hsize))
        if call is None:
            return BAD_ARGUMENT
        token = rt.open_grpc_stream(cluster, *call)
        rt.write_u32(ret_token, token)
        return OK

    def proxy_grpc_send(token, ptr, size, end_stream):
        stream = rt.streams.get(token)
        if stream is None:
            return NOT_FOUND
        rt.charge(size)
        return OK if stream.send(rt.read(ptr, size), bool(end_stream)) else BAD_ARGUMENT

    def proxy_define_metric(metric_type, nptr, nsize, ret_id):
        if metric_type > 2:
            return BAD_ARGUMENT
        rt.charge(nsize)
        slot = rt.guest_metrics.define(metric_type, rt.read(nptr, nsize))
        if slot is None:  # too long a name, too many metrics, or the name has another type
            return BAD_ARGUMENT
        rt.write_u32(ret_id, slot + 1)
        return OK

    def proxy_increment_metric(metric_id, delta):
        """As Envoy: counters only go up, gauges both ways, histograms are recorded, not incremented."""
        slot = metric_slot(metric_id)
        if slot < 0:
            return NOT_FOUND
        kind = rt.guest_metrics.kind(slot)
        if kind == METRIC_HISTOGRAM or (kind == METRIC_COUNTER and delta < 0):
            return BAD_ARGUMENT
        rt.guest_metrics.add(slot, delta)
        return OK

    def proxy_record_metric(metric_id, value):
        """As Envoy: a counter adds the value, a gauge takes it, a histogram observes it."""
        slot = metric_slot(metric_id)
        if slot < 0:
            return NOT_FOUND
        kind = rt.guest_metrics.kind(slot)
        if kind == METRIC_COUNTER:
            rt.guest_metrics.add(slot, value)
        elif kind == METRIC_GAUGE:
            rt.guest_metrics.set(slot, value)
        else:
            rt.guest_metrics.observe(slot, value)
        return OK

    def proxy_get_metric(metric_id, ret):
        slot = metric_slot(metric_id)
        if slot < 0:
            return NOT_FOUND
        if rt.guest_metrics.kind(slot) == METRIC_HISTOGRAM:
            return BAD_ARGUMENT
        rt.write_u64(ret, rt.guest_metrics.get(slot) & 0xFFFFFFFFFFFFFFFF)
        return OK

    def proxy_register_shared_queue(nptr, nsize, ret_token):
        name = rt.read(nptr, nsize)
        if name not in rt.queues:
            if len(rt.queues) >= MAX_QUEUES:
                return BAD_ARGUMENT
            rt.charge(nsize)
            rt.queues[name] = []
            rt.queue_names.append(name)
        rt.write_u32(ret_token, rt.queue_names.index(name) + 1)
        return OK

    def proxy_resolve_shared_queue(_vptr, _vsize, nptr, nsize, ret_token):
        """One VM per filter here: any vm_id resolves among this instance's queues."""
        name = rt.read(nptr, nsize)
        if name not in rt.queues:
            return NOT_FOUND
        rt.write_u32(ret_token, rt.queue_names.index(name) + 1)
        return OK

    def queue_of(token: int) -> list[bytes] | None:
        if not 1 <= token <= len(rt.queue_names):
            return None
        return rt.queues[rt.queue_names[token - 1]]

    def proxy_enqueue_shared_queue(token, ptr, size):
        queue = queue_of(token)
        if queue is None:
            return NOT_FOUND
        if len(queue) >= MAX_QUEUE_ITEMS:
            return BAD_ARGUMENT
        rt.charge(size)
        queue.append(rt.read(ptr, size))
        rt.queue_ready(token)
        return OK

    def proxy_dequeue_shared_queue(token, ret_ptr, ret_size):
        queue = queue_of(token)
        if queue is None:
            return NOT_FOUND
        if not queue:
            return 7  # EMPTY
        return rt.give(queue.pop(0), ret_ptr, ret_size)

    def proxy_get_status(ret_code, ret_ptr, ret_size):
        """The last callout's status: a gRPC call's own status and message while it is being
        delivered; else 0 with an HTTP answer, 14 (UNAVAILABLE) without (gRPC codes)."""
        grpc_answer = rt.grpc_answer
        if grpc_answer is not None:
            rt.write_u32(ret_code, grpc_answer.status)
            return rt.give(grpc_answer.message, ret_ptr, ret_size)
        answer = rt.call_response
        rt.write_u32(ret_code, 0 if answer is not None else 14)
        return rt.give(b"" if answer is not None else b"unavailable", ret_ptr, ret_size)

    def proxy_set_property(pptr, psize, vptr, vsize):
        rt.charge(psize + vsize)
        f = rt.filter
        if f is None:
            return NOT_FOUND
        path = rt.read(pptr, psize).replace(b"\0", b".").strip(b".")
        if f.properties is None:
            f.properties = {}
        f.properties[path] = rt.read(vptr, vsize)
        return OK

    def proxy_clear_route_cache():
        """The route is matched again before it is next used (Lua's clearRouteCache)."""
        f = rt.filter
        if f is not None:
            f.clear_route_cache()
        return OK

    def proxy_call_foreign_function(_nptr, _nsize, _aptr, _asize, _ret_ptr, _ret_size):
        return NOT_FOUND  # Envoy's foreign functions (compress, expr) are not provided

    def proxy_get_shared_data(kptr, ksize, ret_ptr, ret_size, ret_cas):
        item = rt.shared.get(rt.read(kptr, ksize))
        if item is None:
            return NOT_FOUND
        status = rt.give(item[0], ret_ptr, ret_size)
        rt.write_u32(ret_cas, item[1])
        return status

    def proxy_set_shared_data(kptr, ksize, vptr, vsize, cas):
        rt.charge(ksize + vsize)
        key = rt.read(kptr, ksize)
        current = rt.shared.get(key)
        if cas and current is not None and current[1] != cas:
            return 8  # CAS_MISMATCH
        old = ksize + len(current[0]) if current else 0
        if rt.shared_bytes - old + ksize + vsize > MAX_SHARED_DATA_BYTES:
            return BAD_ARGUMENT
        rt.shared_bytes += ksize + vsize - old
        rt.shared[key] = (rt.read(vptr, vsize), (current[1] + 1 if current else 1) & 0xFFFFFFFF)
        return OK

    # WASI: just enough for Rust and TinyGo SDK modules (their runtimes print, read clocks, seed hashers).
    def fd_write(fd, iovs, iovs_len, ret_written):
        if fd not in (1, 2):
            return WASI_BADF
        if iovs_len > WASI_IOV_MAX:
            return WASI_INVAL
        spans = [struct.unpack("<II", rt.read(iovs + 8 * i, 8)) for i in range(iovs_len)]
        rt.charge(sum(size for _, size in spans))  # before copying: iovecs may all alias one region
        data = b"".join(rt.read(ptr, size) for ptr, size in spans)
        level = logging.INFO if fd == 1 else logging.ERROR
        if data.strip() and log.isEnabledFor(level):
            log.log(level, "wasm filter %s: %s", rt.name, data.decode(errors="replace").rstrip())
        rt.write_u32(ret_written, len(data))
        return WASI_SUCCESS

    def clock_time_get(clock_id, _precision, ret):
        if clock_id == 0:
            rt.write_u64(ret, time.time_ns())
        elif clock_id in (1, 2, 3):
            rt.write_u64(ret, time.monotonic_ns())
        else:
            return WASI_NOTSUP
        return WASI_SUCCESS

    def clock_res_get(clock_id, ret):
        if clock_id > 3:
            return WASI_NOTSUP
        rt.write_u64(ret, 1000)
        return WASI_SUCCESS

    def random_get(ptr, size):
        if size > 65536:
            return WASI_INVAL
        rt.write(ptr, os.urandom(size))
        return WASI_SUCCESS

    def zero_sizes(ret_count, ret_size):
        rt.write_u32(ret_count, 0)
        rt.write_u32(ret_size, 0)
        return WASI_SUCCESS

    def nothing(_a, _b):
        return WASI_SUCCESS

    def proc_exit(code):
        raise _ProcExit(code)

    def sched_yield():
        return WASI_SUCCESS

    env = {
        "proxy_log": ([I, I, I], proxy_log),
        "proxy_get_log_level": ([I], proxy_get_log_level),
        "proxy_get_current_time_nanoseconds": ([I], proxy_get_current_time_nanoseconds),
        "proxy_get_buffer_bytes": ([I] * 5, proxy_get_buffer_bytes),
        "proxy_get_buffer_status": ([I] * 3, proxy_get_buffer_status),
        "proxy_set_buffer_bytes": ([I] * 5, proxy_set_buffer_bytes),
        "proxy_get_configuration": ([I, I], proxy_get_configuration),
        "proxy_get_header_map_value": ([I] * 5, proxy_get_header_map_value),
        "proxy_add_header_map_value": ([I] * 5, proxy_add_header_map_value),
        "proxy_replace_header_map_value": ([I] * 5, proxy_replace_header_map_value),
        "proxy_remove_header_map_value": ([I] * 3, proxy_remove_header_map_value),
        "proxy_get_header_map_pairs": ([I] * 3, proxy_get_header_map_pairs),
        "proxy_get_header_map_size": ([I] * 2, proxy_get_header_map_size),
        "proxy_set_header_map_pairs": ([I] * 3, proxy_set_header_map_pairs),
        "proxy_send_local_response": ([I] * 8, proxy_send_local_response),
        "proxy_get_property": ([I] * 4, proxy_get_property),
        "proxy_set_effective_context": ([I], proxy_set_effective_context),
        "proxy_continue_stream": ([I], continue_stream),
        "proxy_close_stream": ([I], proxy_close_stream),
        "proxy_continue_request": ([], proxy_continue_request),
        "proxy_continue_response": ([], proxy_continue_response),
        "proxy_done": ([], proxy_done),
        "proxy_set_tick_period_milliseconds": ([I], proxy_set_tick_period_milliseconds),
        "proxy_http_call": ([I] * 10, proxy_http_call),
        "proxy_grpc_call": ([I] * 12, proxy_grpc_call),
        "proxy_grpc_cancel": ([I], proxy_grpc_cancel),
        "proxy_grpc_close": ([I], proxy_grpc_close),
        "proxy_grpc_stream": ([I] * 9, proxy_grpc_stream),
        "proxy_grpc_send": ([I] * 4, proxy_grpc_send),
        "proxy_register_shared_queue": ([I] * 3, proxy_register_shared_queue),
        "proxy_resolve_shared_queue": ([I] * 5, proxy_resolve_shared_queue),
        "proxy_enqueue_shared_queue": ([I] * 3, proxy_enqueue_shared_queue),
        "proxy_dequeue_shared_queue": ([I] * 3, proxy_dequeue_shared_queue),
        "proxy_get_status": ([I] * 3, proxy_get_status),
        "proxy_set_property": ([I] * 4, proxy_set_property),
        "proxy_clear_route_cache": ([], proxy_clear_route_cache),
        "proxy_call_foreign_function": ([I] * 6, proxy_call_foreign_function),
        "proxy_define_metric": ([I] * 4, proxy_define_metric),
        "proxy_increment_metric": ([I, L], proxy_increment_metric),
        "proxy_record_metric": ([I, L], proxy_record_metric),
        "proxy_get_metric": ([I, I], proxy_get_metric),
        "proxy_get_shared_data": ([I] * 5, proxy_get_shared_data),
        "proxy_set_shared_data": ([I] * 5, proxy_set_shared_data),
    }
    wasi = {
        "fd_write": ([I] * 4, [I], fd_write),
        "clock_time_get": ([I, L, I], [I], clock_time_get),
        "clock_res_get": ([I, I], [I], clock_res_get),
        "random_get": ([I, I], [I], random_get),
        "environ_sizes_get": ([I, I], [I], zero_sizes),
        "environ_get": ([I, I], [I], nothing),
        "args_sizes_get": ([I, I], [I], zero_sizes),
        "args_get": ([I, I], [I], nothing),
        "proc_exit": ([I], [], proc_exit),
        "sched_yield": ([], [I], sched_yield),
    }
    table = {("env", name): (params, [I], impl) for name, (params, impl) in env.items()}
    for wasi_module in WASI_MODULES:
        table.update({(wasi_module, name): entry for name, entry in wasi.items()})
    return table


# ---- stream contexts ---------------------------------------------------------------------------


class StreamContext:
    """What every stream context in the module shares (a request's, WasmFilter; a TCP
    connection's, filters/wasm_tcp.py): its context id in the current instance, the data its
    callback may read (`body_stream`: the buffer type being delivered, -1 none), its end."""

    runtime: Runtime
    factory: Any
    reply: Any
    context_id: int
    generation: int
    timer: Any
    ended_ns: int
    body: bytearray | None
    body_parts: tuple[list[bytes] | None, bytes]

    def _enter(self) -> int:
        """Make sure this request has a context in the current instance, and begin an entry.

        0: skip the hook; 1: the context exists; 2: new here, the guest has not created it yet.
        """
        rt = self.runtime
        if self.context_id:
            if self.generation != rt.generation:
                return 0
            rt.begin(self)
            return 1
        if rt.store is None and not rt.usable():
            return 0
        rt.open(self)
        rt.begin(self)
        return 2

    def _create(self) -> None:
        """proxy_on_context_create for this request (its first hook, not joined to it)."""
        rt = self.runtime
        create = rt.exports.get("proxy_on_context_create")
        if create is not None:
            rt.call_raw(create[0], create[1], self.context_id, ROOT_CONTEXT_ID)

    def guest_body(self) -> bytearray:
        """The body the current body callback is about: what was buffered, then this chunk."""
        body = self.body
        if body is None:
            held, chunk = self.body_parts
            body = self.body = bytearray(b"".join(held)) if held else bytearray()
            body += chunk
        return body

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _delete_context(self) -> None:
        context_id = self.context_id
        rt = self.runtime
        self.ended_ns = time.perf_counter_ns()
        rt.live.pop(context_id, None)
        try:
            ending = rt.ending
            if ending is not None:  # done, log and delete in one entry
                enter = rt.enter  # an attribute, not a method: a plain load is the cheap one
                if enter(self, ending[0], ending[1], context_id, 0, 0) is None:
                    raise rt._fault()
            else:
                rt.begin(self)
                exports = rt.exports
                for name in END_CALLBACKS:
                    func = exports.get(name)
                    if func is not None:
                        rt.call_raw(func[0], func[1], context_id)
        except WasmFault as exc:
            rt.failed(exc, "proxy_on_done/log/delete", self.factory.counters)
        finally:
            rt.filter = None
        self.reply = None  # a reply asked for after the request ended has nowhere to go
