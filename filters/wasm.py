"""The wasm filter: runs Proxy-Wasm ABI v0.2.1 modules (Envoy's WebAssembly filter contract) in wasmtime.

Config (Envoy's `envoy.extensions.wasm.v3.PluginConfig` names, plus shortcuts and limits):

    name: my_plugin                    # plugin_name property and log prefix (default: the filter's name)
    root_id: ""                        # plugin_root_id property
    configuration: "..."               # PLUGIN_CONFIGURATION: a string, {value: "..."} or any mapping (sent as JSON)
    vm_config:
      vm_id: ""
      runtime: envoy.wasm.runtime.wasmtime   # optional; only wasmtime is available
      configuration: "..."             # VM_CONFIGURATION, read in proxy_on_vm_start
      code: {local: {filename: plugin.wasm}}  # or {local: {inline_string: "(module ...)"}}; .wat text works too
    wasm_file: plugin.wasm             # shortcut for vm_config.code.local.filename
    code_wat: "(module ...)"           # shortcut for vm_config.code.local.inline_string
    call_time_limit: 20ms              # how long one host→guest entry may run; past it: 500
    max_memory_bytes: 16777216         # the guest's linear memory cap (memory.grow fails past it)
    pause_timeout: 5s                  # a request the guest pauses without replying gets a 500 after this

The module is compiled once, when the config is validated (the compiled
artifact travels with the config to forked workers, shown in /config_dump as
its digest); validation also instantiates it and runs its start, VM start and
configure callbacks, so a bad module is refused at load with the field named.
Each worker holds one Store and instance per filter; each request gets a
context id (created at its first hook, done/deleted when the request ends).

A trap (including running past call_time_limit) answers the request 500, is counted,
logs one line, and replaces the instance with a fresh one (Envoy's
FAIL_RELOAD): the guest's memory may be inconsistent after a trap. Requests
begun on the replaced instance skip their remaining hooks.

The runtime (one instance, its host functions, its guest calls) is filters/wasm_runtime.py;
a connection's context on a TCP listener is filters/wasm_tcp.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from typing import Any

import wasmtime
from pyproxy.filters.wasm_runtime import (
    DEFAULT_MEMORY,
    DEFAULT_PAUSE_TIMEOUT,
    LOCAL_REPLIES,
    OK,
    PAUSE,
    PAUSE_TIMEOUTS,
    UNIMPLEMENTED,
    CompiledModule,
    Runtime,
    StreamContext,
    WasmFault,
    check_module,
    compile_module,
    engine,
)
from pyproxy.filters.wasm_tcp import WasmTcpFilter
from pyproxy.filters.wasm_time_limit import DEFAULT_CALL_TIME_LIMIT, TICK_MS

from pyproxy.chain.api import (
    CONTINUE,
    RESET_STREAM,
    STOP,
    STOP_AND_BUFFER,
    FilterConfigError,
    FilterFactory,
    HeaderMap,
    HttpFilter,
    downstream_socket,
)
from pyproxy.durations import parse_duration
from pyproxy.guest_metrics import current as worker_metrics

log = logging.getLogger("pyproxy.wasm")
# A context's body parts (held, chunk) between its body callbacks.
_NO_BODY: tuple[list[bytes] | None, bytes] = (None, b"")

# ---- config --------------------------------------------------------------------------------------


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise FilterConfigError(where, "expected a string")
    return value


def _configuration(value, where: str) -> str:
    """Envoy wraps it as google.protobuf.StringValue ({value: ...}); a plain string or any mapping is fine here."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if set(value) <= {"@type", "value"} and isinstance(value.get("value"), str):
            return value["value"]
        return json.dumps(value, separators=(",", ":"))
    raise FilterConfigError(where, "expected a string or a mapping")


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FilterConfigError(where, "expected a positive integer")
    return value


def _source(config: dict) -> tuple[str, str | bytes]:
    """(field, code): exactly one of vm_config.code.local.{filename,inline_string}, wasm_file, code_wat."""
    found: list[tuple[str, object]] = []
    vm = config.get("vm_config") or {}
    code = vm.pop("code", None)
    if code is not None:
        if not isinstance(code, dict) or not isinstance(code.get("local"), dict):
            raise FilterConfigError("vm_config.code", "expected {local: {filename: ...}}")
        local = dict(code["local"])
        for key in ("filename", "inline_string"):
            if key in local:
                found.append((f"vm_config.code.local.{key}", local.pop(key)))
        if local:
            raise FilterConfigError(f"vm_config.code.local.{next(iter(local))}", "unknown field")
        if len(code) > 1:
            raise FilterConfigError("vm_config.code", "only `local` code is supported")
    for key in ("wasm_file", "code_wat"):
        if key in config:
            found.append((key, config.pop(key)))
    if not found:
        raise FilterConfigError("vm_config.code", "required (or wasm_file, or code_wat)")
    if len(found) > 1:
        raise FilterConfigError(found[1][0], f"give one module source (already have {found[0][0]})")
    field, value = found[0]
    value = _string(value, field)
    if field.endswith("filename") or field == "wasm_file":
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise FilterConfigError(field, f"cannot read {value!r}: {exc.strerror}") from None
        if value.endswith(".wat") or not data.startswith(b"\0asm"):
            try:
                return field, data.decode()
            except UnicodeDecodeError:
                raise FilterConfigError(field, "neither a wasm binary nor WAT text") from None
        return field, data
    return field, value


def _call_time_limit(config: dict) -> float:
    """call_time_limit in seconds. The fuel_per_call of earlier configs is still accepted (so
    they load) but no longer bounds anything: guests are bounded by time, not instructions."""
    if "fuel_per_call" in config:
        _positive_int(config.pop("fuel_per_call"), "fuel_per_call")
        log.warning("wasm filter: fuel_per_call is ignored; call_time_limit bounds each guest call")
    try:
        limit = parse_duration(config.pop("call_time_limit", DEFAULT_CALL_TIME_LIMIT))
    except ValueError as exc:
        raise FilterConfigError("call_time_limit", str(exc)) from None
    if not 0 < limit <= 60:
        raise FilterConfigError(
            "call_time_limit",
            f"expected a duration above 0 and at most 60s (counted in {TICK_MS} ms ticks)",
        )
    return limit


# ---- the filter --------------------------------------------------------------------------------


class WasmFactory(FilterFactory):
    name = "wasm"
    modes = ("http", "grpc", "tcp")
    counter_names = ("traps", "over_time_limit", "local_replies", "pause_timeouts")

    @classmethod
    def validate(cls, config: dict) -> dict:
        vm = config.get("vm_config")
        if vm is not None and not isinstance(vm, dict):
            raise FilterConfigError("vm_config", "expected a mapping")
        vm = dict(vm or {})
        config["vm_config"] = vm
        field, code = _source(config)
        runtime = vm.pop("runtime", None)
        if runtime is not None and "wasmtime" not in str(runtime):
            raise FilterConfigError("vm_config.runtime", "only wasmtime is available")
        out = {
            "name": _string(config.pop("name", ""), "name"),
            "root_id": _string(config.pop("root_id", ""), "root_id"),
            "vm_id": _string(vm.pop("vm_id", ""), "vm_config.vm_id"),
            "configuration": _configuration(config.pop("configuration", None), "configuration"),
            "vm_configuration": _configuration(
                vm.pop("configuration", None), "vm_config.configuration"
            ),
            "max_memory_bytes": _positive_int(
                config.pop("max_memory_bytes", DEFAULT_MEMORY), "max_memory_bytes"
            ),
        }
        out["call_time_limit"] = _call_time_limit(config)
        try:
            out["pause_timeout"] = parse_duration(
                config.pop("pause_timeout", DEFAULT_PAUSE_TIMEOUT)
            )
        except ValueError as exc:
            raise FilterConfigError("pause_timeout", str(exc)) from None
        if vm:
            raise FilterConfigError(f"vm_config.{next(iter(vm))}", "unknown field")
        config.pop("vm_config")
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        module = compile_module(field, code)
        check_module(field, module)
        # Instantiate and configure once here: a module that traps, exceeds the memory cap or
        # refuses its configuration is refused at load, not on the first request.
        try:
            Runtime(module, dict(out, name=f"{out['name'] or 'wasm'} (load check)")).close()
        except WasmFault as exc:
            where = "configuration" if "configuration" in str(exc) else field
            raise FilterConfigError(where, str(exc)) from None
        artifact = module.serialize()
        digest = hashlib.sha256(artifact).hexdigest()[:16]
        out["module"] = CompiledModule(
            f"sha256:{digest} ({len(artifact)} bytes compiled)", artifact
        )
        return out

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        module = wasmtime.Module.deserialize(engine(), config["module"].artifact)
        settings = dict(config, name=config["name"] or context.filter_name or "wasm")
        self.runtime = Runtime(module, settings, context.loop, worker_metrics())
        self.runtime.clusters = context.clusters
        self.pause_timeout = config["pause_timeout"]
        # Only the hooks the module exports: a callback it lacks costs nothing per request.
        exports = self.runtime.exports
        hooks: dict[str, object] = {}
        if "proxy_on_request_headers" in exports:
            hooks["decode_headers"] = WasmFilter._decode_headers
        if "proxy_on_response_headers" in exports:
            hooks["encode_headers"] = WasmFilter._encode_headers
        # A module exporting body or trailer callbacks takes the request off the head-only
        # path (as Envoy, which calls them for every chunk whether or not the guest cares).
        if "proxy_on_request_body" in exports:
            hooks["decode_data"] = WasmFilter._decode_data
        if "proxy_on_response_body" in exports:
            hooks["encode_data"] = WasmFilter._encode_data
        if "proxy_on_request_trailers" in exports:
            hooks["decode_trailers"] = WasmFilter._decode_trailers
        if "proxy_on_response_trailers" in exports:
            hooks["encode_trailers"] = WasmFilter._encode_trailers
        self.filter_class = type("WasmFilter", (WasmFilter,), hooks)
        # What the chain calls per request: the class itself, without create()'s frame.
        self.create = partial(self.filter_class, self)  # type: ignore[method-assign]

    def create(self) -> WasmFilter:
        return self.filter_class(self)

    def create_tcp(self) -> WasmTcpFilter:
        return WasmTcpFilter(self)

    def close(self) -> None:
        self.runtime.close()


class WasmFilter(StreamContext, HttpFilter):
    """One request's stream context in the module."""

    defer_destroy = True  # proxy_on_done/log/delete are guest calls: after the response has left

    __slots__ = (
        "factory",
        "runtime",
        "callbacks",
        "context_id",
        "generation",
        "request",
        "response",
        "reply",
        "timer",
        "body",
        "body_parts",
        "body_stream",
        "body_changed",
        "buffering",
    )

    # What most requests never set: class defaults until a request's own value is set (in the
    # instance's dict), so making a request's context does not pay a store for each.
    paused = -1  # the stream type (0 request, 1 response) the guest paused, or -1
    properties: dict[bytes, bytes] | None = None  # set by proxy_set_property
    request_trailers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    started_ns = 0  # when the request began (set with its context)
    ended_ns = 0  # when the request ended (its done/log callbacks began): request.duration
    reply_details = ""  # the details of the local reply the guest sent

    def __init__(self, factory: WasmFactory) -> None:
        self.factory = factory
        self.runtime = factory.runtime
        self.context_id = 0
        self.generation = 0
        self.request = None
        self.response = None
        # (status, body, headers, grpc status, details) of a local reply the guest asked for.
        self.reply: tuple[int, bytes, list, int | None, bytes] | None = None
        self.timer = None
        # During a body callback: the body the guest sees (what was buffered + this chunk) and
        # which buffer type it is; whether the guest wrote it; per stream, whether it is buffering.
        self.body: bytearray | None = None
        self.body_parts: tuple[list[bytes] | None, bytes] = _NO_BODY  # (held, chunk)
        self.body_stream = -1
        self.body_changed = False
        self.buffering = 0  # bit `stream`: that stream is buffering

    def _began(self) -> None:
        """This request's context is new: note when the request began (request.duration), from
        its exchange, or the native lane carrying it (whose start moves on with the next
        request, so it is read now)."""
        exchange = getattr(self.callbacks, "exchange", None)  # a stand-in chain may have none
        self.started_ns = getattr(exchange, "started_ns", 0) or 0

    def downstream_socket(self):
        return downstream_socket(self.callbacks)

    def listener(self):
        return getattr(self.callbacks.exchange.ctx, "listener", None)

    # The hooks the chain calls (made by _headers_hook and _body_hook, below the class: one
    # function per hook, no wrapper frame between the chain and the guest).
    _decode_headers: Any
    _encode_headers: Any
    _decode_data: Any
    _encode_data: Any

    def _decode_trailers(self, trailers) -> int:
        self.request_trailers = HeaderMap(trailers, {})
        return self._trailers("proxy_on_request_trailers", self.request_trailers, 0)

    def _encode_trailers(self, trailers) -> int:
        self.response_trailers = HeaderMap(trailers, {})
        return self._trailers("proxy_on_response_trailers", self.response_trailers, 1)

    def _know_heads(self) -> None:
        """The heads, for a module with body or trailer callbacks but no header callback."""
        callbacks = self.callbacks
        if self.request is None:
            self.request = callbacks.request_headers()
        if self.response is None:
            self.response = callbacks.response_headers()

    def _begin_entry(self) -> bool:
        """Begin an entry for this request's context, made first in the guest if it is new
        (proxy_on_context_create); False: the hook is skipped (see _unavailable)."""
        entered = self._enter()
        if entered == 2:
            self._began()
            self._create()
        return entered != 0

    def _trailers(self, callback: str, trailers: HeaderMap, stream: int) -> int:
        rt = self.runtime
        self._know_heads()
        try:
            if not self._begin_entry():
                return self._unavailable()
            func, n = rt.exports[callback]
            action = rt.call_raw(func, n, self.context_id, len(trailers.headers))
        except WasmFault as exc:
            return self._fault(exc, callback)
        if self.reply is not None:
            return self._send_reply()
        return self._pause(stream, STOP) if action == PAUSE else CONTINUE

    def _pause(self, stream: int, status: int) -> int:
        """The guest paused: STOP until proxy_continue_stream (or the pause timeout)."""
        if self.paused == -2 - stream:  # the guest resumed before returning
            self.paused = -1
            return CONTINUE
        self.paused = stream
        self.timer = self.callbacks.loop.call_later(self.factory.pause_timeout, self._timed_out)
        return status

    def _unavailable(self) -> int:
        if self.context_id:
            return CONTINUE  # begun on an instance that has since been replaced
        self.callbacks.send_local_reply(500, b"wasm filter unavailable\n")
        return STOP

    def _fault(self, exc: WasmFault, where: str) -> int:
        self.runtime.failed(exc, where, self.factory.counters)
        self.callbacks.send_local_reply(500, b"wasm filter failed\n")
        return STOP

    def _send_reply(self) -> int:
        assert self.reply is not None, "sent only once the guest asked for a reply"
        status, body, headers, grpc, details = self.reply
        self.reply = None
        self.reply_details = details.decode(errors="replace")
        self._cancel_timer()
        if status == RESET_STREAM:
            self.callbacks.reset_stream("LR", self.reply_details)
            return STOP
        self.factory.counters[LOCAL_REPLIES] += 1
        self.callbacks.send_local_reply(
            status, body, headers, grpc_status=grpc, details=details.decode(errors="replace")
        )
        return STOP

    def clear_route_cache(self) -> None:
        self.callbacks.clear_route_cache()

    def close_stream(self, stream_type: int) -> None:
        """proxy_close_stream: reset the request's stream after the current guest call returns."""
        if stream_type <= 1:
            self.reply = (RESET_STREAM, b"", [], None, b"wasm_close_stream")

    def continue_stream(self, stream_type: int) -> int:
        """proxy_continue_stream: request or response resumes; in an HTTP context, as in Envoy,
        downstream is a no-op and upstream UNIMPLEMENTED."""
        if stream_type == 3:
            return UNIMPLEMENTED
        if stream_type < 2:
            self.resume(stream_type)
        return OK

    def resume(self, stream: int) -> None:
        """proxy_continue_stream from the guest: go on after the current guest call returns."""
        if self.paused == stream:
            self.paused = -1
            self._cancel_timer()
            go_on = (
                self.callbacks.continue_decoding
                if stream == 0
                else self.callbacks.continue_encoding
            )
            self.callbacks.loop.call_soon(go_on)
        elif self.paused == -1:
            self.paused = -2 - stream  # resumed during the very callback that will return Pause

    def _timed_out(self) -> None:
        self.timer = None
        self.paused = -1
        self.factory.counters[PAUSE_TIMEOUTS] += 1
        self.callbacks.send_local_reply(500, b"wasm filter paused the request and never resumed\n")

    def orphaned(self) -> None:
        """The instance holding this context was replaced: forget the context, release a pause."""
        if self.paused >= 0:
            self._cancel_timer()
            stream, self.paused = self.paused, -1
            go_on = (
                self.callbacks.continue_decoding
                if stream == 0
                else self.callbacks.continue_encoding
            )
            self.callbacks.loop.call_soon(go_on)

    def on_destroy(self) -> None:
        if self.timer is not None:
            self._cancel_timer()
        rt = self.runtime
        if rt.calls:
            rt.cancel_calls(self)
        if not self.context_id or self.generation != rt.generation:
            return
        self._delete_context()  # guest calls the request pays for: the chain times on_destroy


def _headers_hook(callback: str, stream: int):
    """WasmFilter's request (stream 0) or response (1) headers hook, for `callback`."""

    def hook(self: WasmFilter, headers, end_stream: bool) -> int:
        if stream:
            self.response = headers
        else:
            self.request = headers
        rt = self.runtime
        count = len(headers.headers) + len(headers.pseudo)
        try:
            context_id = self.context_id
            if context_id and self.generation == rt.generation:
                # The context exists (the response's headers, say): _enter's case 1, its
                # bookkeeping done by rt.enter with the call.
                func, n = rt.exports[callback]
                enter = rt.enter  # an attribute, not a method: a plain load is the cheap one
                action = enter(self, func, n, context_id, count, end_stream)
            elif not context_id and rt.store is not None:
                # The request's first hook (_enter's case 2, and _began, without their calls).
                context_id = rt.open(self)
                exchange = getattr(self.callbacks, "exchange", None)
                self.started_ns = getattr(exchange, "started_ns", 0) or 0
                joined = rt.entering.get(callback)
                if joined is None:
                    rt.begin(self)
                    self._create()
                    joined = rt.exports[callback]
                    action = rt.entry(joined[0], joined[1], context_id, count, end_stream)
                else:
                    enter = rt.enter
                    action = enter(self, joined[0], joined[1], context_id, count, end_stream)
            else:
                entered = self._enter()
                if not entered:
                    return self._unavailable()
                context_id = self.context_id
                joined = None
                if entered == 2:
                    self._began()
                    joined = rt.entering.get(callback)
                if joined is not None:  # proxy_on_context_create and the callback in one entry
                    action = rt.entry(joined[0], joined[1], context_id, count, end_stream)
                else:
                    if entered == 2:
                        self._create()
                    func, n = rt.exports[callback]
                    action = rt.entry(func, n, context_id, count, end_stream)
            if action is None:
                raise rt._fault()
        except WasmFault as exc:
            return self._fault(exc, callback)
        if self.reply is not None:
            return self._send_reply()
        if action == PAUSE:
            return self._pause(stream, STOP)
        return CONTINUE

    return hook


def _body_hook(callback: str, stream: int):
    """WasmFilter's request (stream 0) or response (1) body hook, for `callback`: one body chunk
    for the guest. Pause before the end buffers (Envoy's StopIterationAndBuffer): the next call
    sees everything held so far plus its chunk, so at end_of_stream the guest can read and
    rewrite the whole body."""

    def hook(self: WasmFilter, data, end_stream: bool) -> int:
        rt = self.runtime
        if self.request is None or self.response is None:
            self._know_heads()
        if self.buffering and self.buffering >> stream & 1:
            held = self.callbacks.held_body["encode" if stream else "decode"]
            size = len(data) + sum(map(len, held))
        else:  # the usual: nothing held, the chunk is the body
            held = None
            size = len(data)
        try:
            if self.context_id and self.generation == rt.generation:
                enter = rt.enter  # _enter's case 1: its bookkeeping done with the call
            elif not self._begin_entry():
                return self._unavailable()
            else:
                enter = None  # the entry begun (and the context made) by _begin_entry
            # The body is built only if the guest asks for it (guest_body).
            self.body_parts = (held, data)
            self.body_stream = stream
            self.body_changed = False
            func, n = rt.exports[callback]
            if enter is not None:
                action = enter(self, func, n, self.context_id, size, end_stream)
            else:
                action = rt.entry(func, n, self.context_id, size, end_stream)
            if action is None:
                raise rt._fault()
        except WasmFault as exc:
            return self._fault(exc, callback)
        finally:
            body = self.body
            if body is not None:
                self.body = None
            self.body_parts = _NO_BODY
            self.body_stream = -1
        if self.reply is not None:
            return self._send_reply()
        if self.body_changed and body is not None:
            if held:
                held.clear()
            self.callbacks.replace_data(bytes(body))
        if action == PAUSE and not end_stream:
            self.buffering |= 1 << stream
            return STOP_AND_BUFFER
        if self.buffering:
            self.buffering &= ~(1 << stream)
        if action == PAUSE:  # at the end: held until the guest continues (an http_call, say)
            return self._pause(stream, STOP_AND_BUFFER)
        return CONTINUE

    return hook


WasmFilter._decode_headers = _headers_hook("proxy_on_request_headers", 0)
WasmFilter._encode_headers = _headers_hook("proxy_on_response_headers", 1)
WasmFilter._decode_data = _body_hook("proxy_on_request_body", 0)
WasmFilter._encode_data = _body_hook("proxy_on_response_body", 1)
