"""The wasm filter through a real pyproxy process: Proxy-Wasm modules (hand-written WAT) edit, answer, trap and run away."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import curl, require_capability, split_response, start_listener
from http_peer import HttpUpstream

pytest.importorskip("wasmtime")

EXAMPLES = Path(__file__).resolve().parent.parent / "filters" / "wasm_examples"


@pytest.fixture(scope="module")
def upstream():
    server = HttpUpstream()
    yield server
    server.close()


def _proxy(start_proxy, tmp_path, upstream_address: str, filters: str, ready: bool = True):
    return start_listener(
        start_proxy, tmp_path, upstream_address, f"    filters:\n{filters}", ready=ready
    )


def _proxy_wat(start_proxy, tmp_path, upstream_address: str, name: str, wat: str, extra=""):
    """A proxy whose one filter is this WebAssembly text, inline."""
    return _proxy(
        start_proxy, tmp_path, upstream_address, _wasm(name, f"code_wat: {json.dumps(wat)}", extra)
    )


def _wasm(name: str, source: str, extra: str = "") -> str:
    return f"""
      - name: {name}
        type: wasm
        config:
          {source}
          {extra}
"""


def test_headers_edited_both_ways_and_configuration_logged(start_proxy, tmp_path, upstream):
    source = f"vm_config: {{code: {{local: {{filename: {EXAMPLES / 'headers.wat'}}}}}}}"
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, _wasm("hdrs", source, "configuration: cfg-7f3a")
    )
    run = curl(
        "-i",
        "-H",
        "x-wasm-replace: original",
        "-H",
        "x-wasm-remove: gone",
        "-H",
        "x-keep: kept",
        f"http://127.0.0.1:{port}/echo",
    )
    status, headers, body = split_response(run.stdout)
    assert status == 200, run
    seen = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
    assert seen["x-wasm-added"] == "yes"
    assert seen["x-wasm-replace"] == "replaced"
    assert "x-wasm-remove" not in seen
    assert seen["x-keep"] == "kept"
    assert headers["x-wasm-response"] == "hello"
    # read back through proxy_get_header_map_value on the response map
    assert headers["x-wasm-saw-content-type"] == "application/json"
    # proxy_on_configure read its configuration (proxy_get_buffer_bytes) and logged it (proxy_log)
    assert "wasm filter hdrs: headers example configured: cfg-7f3a" in proxy.output
    stages = proxy.listener()["stages"]
    assert stages["filter:hdrs"]["events"] >= 2 and stages["filter:hdrs"]["ns"] > 0


def test_local_response_from_the_module(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        _wasm("deny", f"wasm_file: {EXAMPLES / 'deny.wat'}"),
    )
    before = len(upstream.requests)
    status, headers, body = split_response(
        curl("-i", "-H", "x-deny: 1", f"http://127.0.0.1:{port}/echo").stdout
    )
    assert (status, body) == (403, b"denied by wasm\n")
    assert headers["x-wasm-deny"] == "1"
    assert len(upstream.requests) == before  # never reached the upstream
    status, _, _ = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 200
    assert proxy.listener()["filters"]["deny"]["local_replies"] == 1


def test_trap_answers_500_and_the_proxy_keeps_serving(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        _wasm("trapper", f"wasm_file: {EXAMPLES / 'trap.wat'}"),
    )
    for _ in range(2):
        status, _, _ = split_response(
            curl("-i", "-H", "x-trap: 1", f"http://127.0.0.1:{port}/echo").stdout
        )
        assert status == 500
        status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
        assert status == 200 and json.loads(body)["target"] == "/echo"
    assert proxy.listener()["filters"]["trapper"]["traps"] == 2
    assert proxy.output.count("wasm filter trapper: trap:") == 2
    assert "unreachable" in proxy.output


@pytest.mark.parametrize("ticker", ["native", "python"])
def test_runaway_guest_is_stopped_by_its_call_time_limit(
    start_proxy, tmp_path, upstream, monkeypatch, ticker
):
    """Stopped by the native module's epoch ticker, or without it by a Python thread's."""
    if ticker == "python":
        monkeypatch.setenv("PYPROXY_DISABLE_NATIVE", "1")
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        _wasm("spin", f"wasm_file: {EXAMPLES / 'runaway.wat'}", "call_time_limit: 50ms"),
    )
    started = time.monotonic()
    status, _, _ = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 500
    assert time.monotonic() - started < 2.0
    counters = proxy.listener()["filters"]["spin"]
    assert counters["over_time_limit"] == 1 and counters["traps"] == 0
    assert "wasm filter spin: trap: ran past call_time_limit (50 ms)" in proxy.output
    # still serving (and still stopping the loop) afterwards
    assert split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)[0] == 500
    assert split_response(curl("-i", f"{proxy.admin}/ready").stdout)[0] == 200


BAD_MODULES = {
    "invalid_wat": ("(module (func", "invalid module"),
    "wrong_abi": (
        '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_3_0"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0))',
        "unsupported Proxy-Wasm ABI 0.3.0",
    ),
    "no_memory": (
        '(module (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0))',
        "exports no memory",
    ),
    "spins_in_configure": (
        '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "proxy_on_configure") (param i32 i32) (result i32) (loop $l (br $l))'
        " i32.const 1))",
        "ran past call_time_limit (20 ms)",
    ),
    "imports_a_host_function_pyproxy_lacks": (
        '(module (import "env" "proxy_make_coffee" (func (param i32) (result i32)))'
        ' (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0))',
        "imports env.proxy_make_coffee, a host function pyproxy does not provide",
    ),
    "metadata_callback_with_the_wrong_signature": (
        '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "proxy_on_request_metadata") (param i32 i32 i32 i32) (result i32)'
        " i32.const 0))",
        "export proxy_on_request_metadata has signature",
    ),
    "traps_at_start": (
        '(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))'
        ' (func (export "malloc") (param i32) (result i32) i32.const 0)'
        ' (func (export "_start") unreachable))',
        "trap",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_bad_module_refused_at_config_load(start_proxy, tmp_path, upstream, case):
    wat, reason = BAD_MODULES[case]
    proxy, _ = _proxy(
        start_proxy, tmp_path, upstream.address, _wasm("bad", f"code_wat: {json.dumps(wat)}"), False
    )
    assert proxy.proc.wait(15) == 2
    assert "filters[0].config.code_wat" in proxy.output and reason in proxy.output, proxy.output


def test_noop_module_is_timed_as_its_own_stage(start_proxy, tmp_path, upstream):
    """Every request's guest calls land in the filter's stage (the cost itself is bench/filter_bench.py's job)."""
    import shutil

    require_capability("wrk (wrk; make test installs it)", shutil.which("wrk") is not None)
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        _wasm("noop", f"wasm_file: {EXAMPLES / 'noop.wat'}"),
    )
    for _ in range(1):
        before = proxy.listener()
        run = subprocess.run(
            ["wrk", "-t1", "-c4", "-d1s", f"http://127.0.0.1:{port}/w"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Non-2xx" not in run.stdout and "Socket errors" not in run.stdout, run.stdout
        after = proxy.listener()
        requests = after["requests"] - before["requests"]
        ns = after["stages"]["filter:noop"]["ns"] - before["stages"]["filter:noop"]["ns"]
        events = (
            after["stages"]["filter:noop"]["events"] - before["stages"]["filter:noop"]["events"]
        )
        assert requests > 100 and events >= 2 * requests - 8
        assert ns > 0


def test_pairs_serialization_matches_the_spec_example():
    from pyproxy.filters.wasm_encoding import deserialize_pairs, serialize_pairs

    # ABI v0.2.1 "Serialization": {"a": "1", "b": "22"}
    wire = bytes([2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0])
    wire += b"a\x001\x00b\x0022\x00"
    assert serialize_pairs([(b"a", b"1"), (b"b", b"22")]) == wire
    assert deserialize_pairs(wire) == [(b"a", b"1"), (b"b", b"22")]
    assert deserialize_pairs(b"") == deserialize_pairs(b"\x00") == []
    with pytest.raises(ValueError):
        deserialize_pairs(wire[:-3])


PAIRS_ROUND_TRIP = """
(module
  (import "env" "proxy_get_header_map_pairs" (func $get (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 4096))
    (if (call $get (i32.const 0) (i32.const 256) (i32.const 260)) (then unreachable))
    (if (call $set (i32.const 0) (i32.load (i32.const 256)) (i32.load (i32.const 260)))
      (then unreachable))
    (i32.const 0)))
"""


def test_header_pairs_round_trip_through_the_guest(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "pairs", PAIRS_ROUND_TRIP)
    run = curl(
        "-i",
        "-H",
        "x-keep: kept",
        "-H",
        "x-twice: 1",
        "-H",
        "x-twice: 2",
        f"http://127.0.0.1:{port}/echo?q=1",
    )
    status, _, body = split_response(run.stdout)
    assert status == 200, run
    echoed = json.loads(body)
    assert echoed["target"] == "/echo?q=1" and echoed["method"] == "GET"
    seen = [(k.lower(), v) for k, v in echoed["headers"]]
    assert ("x-keep", "kept") in seen
    assert [v for k, v in seen if k == "x-twice"] == ["1", "2"]
    assert proxy.listener()["filters"]["pairs"]["traps"] == 0


# ---- in-process: the host's entries into the guest ----------------------------------------

_RECORDER = """(module
  (memory (export "memory") 1)
  (global $log (mut i32) (i32.const 0))
  (global $spin (mut i32) (i32.const 0))
  (func $rec (param $d i32)
    (local $i i32)
    (global.set $log (i32.add (i32.mul (global.get $log) (i32.const 10)) (local.get $d)))
    ;; Spin for the same time in every callback (the time limit test sets $spin).
    (block $out (loop $again
      (br_if $out (i32.ge_u (local.get $i) (global.get $spin)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $again))))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param $c i32) (param $p i32)
    (if (i32.eq (local.get $p) (i32.const 1)) (then (call $rec (i32.const 1)))))
  REQUEST
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 3)) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (call $rec (i32.const 4)) (i32.const 1))
  LOG
  (func (export "proxy_on_delete") (param i32) (call $rec (i32.const 6)))
  (func (export "spin") (param i32) (global.set $spin (local.get 0)))
  (func (export "take") (result i32) (global.get $log) (global.set $log (i32.const 0))))"""
_REQUEST_V021 = """(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 2)) (i32.const 0))"""
_REQUEST_V010 = """(func (export "proxy_on_request_headers") (param i32 i32) (result i32)
    (call $rec (i32.const 2)) (i32.const 0))"""
_LOG = """(func (export "proxy_on_log") (param i32) (call $rec (i32.const 5)))"""


def _recorder(request: str = _REQUEST_V021, log: str = _LOG, **config):
    from pyproxy.filters.wasm import WasmFactory

    from pyproxy.chain.api import FactoryContext

    wat = _RECORDER.replace("REQUEST", request).replace("LOG", log)
    validated = WasmFactory.validate({"code_wat": wat, **config})
    return WasmFactory(validated, FactoryContext(None, "main", "http"))


class _Replies:
    """Stands in for the chain's callbacks: records the local replies the filter sends."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_local_reply(self, status: int, *args, **kwargs) -> None:
        self.sent.append(status)


def _one_request(factory) -> list[int]:
    from pyproxy.chain.api import HeaderMap

    instance = factory.create()
    instance.callbacks = replies = _Replies()
    request = HeaderMap([(b"host", b"x")], {b":method": b"GET", b":path": b"/"})
    response = HeaderMap([(b"content-length", b"0")], {b":status": b"200"})
    instance.decode_headers(request, True)
    instance.encode_headers(response, False)
    instance.on_destroy()
    return replies.sent


@pytest.mark.parametrize(
    ("request_hook", "log_hook", "expected"),
    [
        (_REQUEST_V021, _LOG, 123456),
        (_REQUEST_V010, _LOG, 123456),  # ABI 0.1.0: no end_of_stream parameter
        (_REQUEST_V021, "", 12346),  # no proxy_on_log
    ],
)
def test_each_request_callback_runs_once_in_abi_order(request_hook, log_hook, expected):
    """Context create + request headers, and done/log/delete, go in one entry each: same calls, same order."""
    factory = _recorder(request_hook, log_hook)
    take = factory.runtime.instance.exports(factory.runtime.store)["take"]
    try:
        for _ in range(3):
            assert _one_request(factory) == []
            assert factory.counters[0] == factory.counters[1] == 0  # no trap: same instance
            assert take(factory.runtime.store) == expected
        assert not factory.runtime.live
    finally:
        factory.close()


@pytest.mark.parametrize("value", ["0ms", "-5ms", "soon", "2m", True])
def test_call_time_limit_is_checked_at_load(value):
    from pyproxy.filters.wasm import WasmFactory

    from pyproxy.chain.api import FilterConfigError

    config = {"wasm_file": str(EXAMPLES / "noop.wat"), "call_time_limit": value}
    with pytest.raises(FilterConfigError) as refused:
        WasmFactory.validate(config)
    assert refused.value.field == "call_time_limit"


def test_fuel_per_call_of_older_configs_loads_with_a_warning_and_bounds_nothing(caplog):
    from pyproxy.filters.wasm import WasmFactory

    config = {"wasm_file": str(EXAMPLES / "noop.wat"), "fuel_per_call": 1000}
    validated = WasmFactory.validate(config)
    assert "fuel_per_call" not in validated and validated["call_time_limit"] == 0.02
    assert "fuel_per_call is ignored" in caplog.text


def test_guest_running_away_inside_a_host_call_is_counted_as_over_its_time_limit():
    """The host allocates in the guest for proxy_get_header_map_value's answer; an allocator
    that never returns is stopped in that nested call, and the request's entry with it."""
    from pyproxy.filters.wasm import WasmFactory

    from pyproxy.chain.api import FactoryContext

    wat = """(module
      (import "env" "proxy_get_header_map_value"
        (func $get (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "host")
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32)
        (loop $spin (br $spin)) (i32.const 1024))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $get (i32.const 0) (i32.const 0) (i32.const 4) (i32.const 64) (i32.const 68)))
        (i32.const 0))
      (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
        (i32.const 0)))"""
    validated = WasmFactory.validate({"code_wat": wat, "call_time_limit": "50ms"})
    factory = WasmFactory(validated, FactoryContext(None, "main", "http"))
    try:
        started = time.perf_counter()
        assert _one_request(factory) == [500]
        assert time.perf_counter() - started < 2.0
        assert factory.counters[1] == 1 and factory.counters[0] == 0  # over_time_limit, traps
        assert factory.runtime.usable()  # replaced by a fresh instance
    finally:
        factory.close()


def test_call_time_limit_bounds_each_entry_not_the_request():
    """Each entry may run for call_time_limit: entries that each stay well under it are never
    stopped, though together (a request's three entries, requests for twice the limit) they
    run past it; an entry that runs away on its own is stopped soon after its limit, answered 500."""
    limit = 0.2
    factory = _recorder(call_time_limit=f"{limit * 1000:g}ms")
    rt = factory.runtime
    exports = rt.instance.exports(rt.store)
    try:
        exports["spin"](rt.store, 10_000_000)  # calibrate: a request spins in six callbacks
        started = time.perf_counter()
        assert _one_request(factory) == []
        per_spin = (time.perf_counter() - started) / 6e7
        assert exports["take"](rt.store) == 123456
        # The longest entry (done + log + delete) spins three times: 36 ms, 18 % of the limit.
        exports["spin"](rt.store, int(0.012 / per_spin))
        started = time.perf_counter()
        while time.perf_counter() - started < 2 * limit:
            assert _one_request(factory) == []
            # Checked first: a trap replaces the instance, and its old exports must not be used.
            assert factory.counters[1] == 0 and factory.counters[0] == 0  # over_time_limit, traps
            assert exports["take"](rt.store) == 123456
        # Now a callback runs away on its own: unbounded, its first entry would take longer
        # than the bound checked here.
        runaway = 2**31 - 1
        assert 2 * runaway * per_spin > 4 * limit
        exports["spin"](rt.store, runaway)
        started = time.perf_counter()
        assert _one_request(factory) == [500]
        assert time.perf_counter() - started < 4 * limit
        assert factory.counters[1] == 1
    finally:
        factory.close()


# The guest's header-writing and allocation boilerplate for the modules below.
_GUEST = """
  (memory (export "memory") {pages})
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 8192))
"""

# Tries the host's files and sockets through WASI, then reports each errno (two digits) in a
# request header. A WASI runtime with a preopened directory would answer 0 (success) somewhere.
WASI_ESCAPE = (
    """
(module
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) "x-wasi")
  (data (i32.const 200) "/etc/passwd")
  (func $put (param $i i32) (param $e i32)
    (local $at i32)
    (local.set $at (i32.add (i32.const 400) (i32.mul (local.get $i) (i32.const 3))))
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.div_u (local.get $e) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 1))
      (i32.add (i32.const 48) (i32.rem_u (local.get $e) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 2)) (i32.const 44)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.store (i32.const 320) (i32.const 1024))
    (i32.store (i32.const 324) (i32.const 512))
    ;; the preopened directory wasi-libc looks for first
    (call $put (i32.const 0) (call $prestat (i32.const 3) (i32.const 300)))
    (call $put (i32.const 1) (call $open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 11)
      (i32.const 0) (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 304)))
    ;; the host process's own stdin, a guessed file descriptor, a guessed listening socket
    (call $put (i32.const 2) (call $read (i32.const 0) (i32.const 320) (i32.const 1) (i32.const 308)))
    (call $put (i32.const 3) (call $read (i32.const 5) (i32.const 320) (i32.const 1) (i32.const 308)))
    (call $put (i32.const 4) (call $accept (i32.const 6) (i32.const 0) (i32.const 312)))
    (call $put (i32.const 5) (call $write (i32.const 7) (i32.const 320) (i32.const 1) (i32.const 308)))
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 400) (i32.const 17)))
    (i32.const 0)))
"""
)


def test_guest_cannot_reach_host_files_or_sockets_through_wasi(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "wasi", WASI_ESCAPE)
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 200
    errnos = dict(json.loads(body)["headers"])["x-wasi"].split(",")
    # BADF for descriptors (no preopens: nothing to open relative to), NOSYS for the rest.
    assert errnos == ["08", "52", "08", "08", "52", "08"], errnos


# Each spends the host's time or memory, not its own time or memory: a host call in a loop,
# 300 header values of 1 MiB, header adds in a loop, one fd_write whose 300 iovecs all point
# at the same 1 MiB. The
# time limit is lifted to show the host's own bounds stop them.
HOST_BOMBS = {
    "host_call_loop": (
        '(import "env" "proxy_get_log_level" (func $level (param i32) (result i32)))',
        "(loop $more (drop (call $level (i32.const 64))) (br $more))",
        "more than 10000 host calls in one entry",
    ),
    "header_values": (
        '(import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))',
        "(loop $more (drop (call $add (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 8192)"
        " (i32.const 1048576))) (local.set $i (i32.add (local.get $i) (i32.const 1)))"
        " (br_if $more (i32.lt_u (local.get $i) (i32.const 300))))",
        "more than 1048576 bytes handed to the host",
    ),
    # Small header adds, each the native crossing's plain case: its count is bounded too.
    "header_adds": (
        '(import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))',
        "(loop $more (drop (call $add (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 0)"
        " (i32.const 1))) (br $more))",
        "more than 10000 host calls in one entry",
    ),
    "aliased_iovecs": (
        '(import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))',
        "(loop $fill (i32.store (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 8)))"
        " (i32.const 8192)) (i32.store (i32.add (i32.const 1028) (i32.mul (local.get $i) (i32.const 8)))"
        " (i32.const 1048576)) (local.set $i (i32.add (local.get $i) (i32.const 1)))"
        " (br_if $fill (i32.lt_u (local.get $i) (i32.const 300))))"
        " (drop (call $write (i32.const 1) (i32.const 1024) (i32.const 300) (i32.const 0)))",
        "more than 1048576 bytes handed to the host",
    ),
}


@pytest.mark.parametrize("case", sorted(HOST_BOMBS))
def test_host_time_and_memory_a_guest_asks_for_are_bounded(start_proxy, tmp_path, upstream, case):
    imports, body, reason = HOST_BOMBS[case]
    wat = (
        f"(module {imports}"
        + _GUEST.format(pages=17)
        + '(data (i32.const 0) "x-bomb")'
        + '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)'
        + f" (local $i i32) {body} (i32.const 0)))"
    )
    proxy, port = _proxy_wat(
        start_proxy, tmp_path, upstream.address, "bomb", wat, "call_time_limit: 30s"
    )
    rss_before = proxy.rss_kib()
    started = time.monotonic()
    status, _, _ = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 500
    assert time.monotonic() - started < 2.0
    assert proxy.rss_kib() - rss_before < 64 * 1024  # old: +300 MiB
    assert split_response(curl("-i", f"{proxy.admin}/ready").stdout)[0] == 200
    deadline = time.monotonic() + 3
    while reason not in proxy.output and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reason in proxy.output, proxy.output
    assert proxy.listener()["filters"]["bomb"]["traps"] == 1


# A shared queue (register, enqueue, proxy_on_queue_ready, dequeue) and properties: the request's
# url_path goes into a request header; the queued item, moved to shared data by the queue
# callback, into a response header.
QUEUE_AND_PROPERTIES = (
    """
(module
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) "q")
  (data (i32.const 110) "hello")
  (data (i32.const 120) "got")
  (data (i32.const 130) "x-queued")
  (data (i32.const 140) "request\\00url_path")
  (data (i32.const 160) "x-url-path")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $register (i32.const 100) (i32.const 1) (i32.const 200)))
    (drop (call $enqueue (i32.load (i32.const 200)) (i32.const 110) (i32.const 5)))
    (drop (call $property (i32.const 140) (i32.const 16) (i32.const 204) (i32.const 208)))
    (drop (call $add (i32.const 0) (i32.const 160) (i32.const 10)
      (i32.load (i32.const 204)) (i32.load (i32.const 208))))
    (i32.const 0))
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (drop (call $dequeue (local.get 1) (i32.const 204) (i32.const 208)))
    (drop (call $set (i32.const 120) (i32.const 3)
      (i32.load (i32.const 204)) (i32.load (i32.const 208)) (i32.const 0))))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $get (i32.const 120) (i32.const 3) (i32.const 204) (i32.const 208) (i32.const 212)))
    (drop (call $add (i32.const 2) (i32.const 130) (i32.const 8)
      (i32.load (i32.const 204)) (i32.load (i32.const 208))))
    (i32.const 0)))
"""
)


def test_shared_queue_and_properties_reach_the_guest(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "q", QUEUE_AND_PROPERTIES)
    status, headers, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo?x=1").stdout)
    assert status == 200
    assert headers["x-queued"] == "hello"
    assert dict(json.loads(body)["headers"])["x-url-path"] == "/echo"


# set_buffer_bytes as the spec says: [start, start + length) becomes the data; start 0 with
# length 0 prepends; a start at or past the end appends. Each check traps when the host
# answers otherwise; the request body (paused until its end, so buffered) is then echoed.
BODY_EDIT = """(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_status" (func $status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "<<>>HOWDYcontent-length")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func $expect (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $expect (call $remove (i32.const 0) (i32.const 109) (i32.const 14)) (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $len i32) (param $eos i32)
    (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (call $expect (call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2))
      (i32.const 0))
    (call $expect (call $set (i32.const 0) (i32.add (local.get $len) (i32.const 2)) (i32.const 0)
      (i32.const 102) (i32.const 2)) (i32.const 0))
    (call $expect (call $set (i32.const 0) (i32.const 2) (i32.const 5) (i32.const 104) (i32.const 5))
      (i32.const 0))
    (call $expect (call $status (i32.const 0) (i32.const 200) (i32.const 204)) (i32.const 0))
    (call $expect (i32.load (i32.const 200)) (i32.add (local.get $len) (i32.const 4)))
    ;; the response body is not the guest's now; 9 is no buffer type at all
    (call $expect (call $set (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2))
      (i32.const 1))
    (call $expect (call $set (i32.const 9) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2))
      (i32.const 2))
    (i32.const 0)))"""


def test_set_buffer_bytes_replaces_prepends_and_appends(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "edit", BODY_EDIT)
    run = curl("-i", "--data-binary", "hello world", f"http://127.0.0.1:{port}/echo")
    status, _, body = split_response(run.stdout)
    assert status == 200, proxy.output
    expected = b"<<HOWDY world>>"
    assert json.loads(body)["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert proxy.listener()["filters"]["edit"]["traps"] == 0


LOGS_AT_TWO_LEVELS = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "debug-lineinfo-line")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $log (i32.const 1) (i32.const 100) (i32.const 10)))
    (drop (call $log (i32.const 2) (i32.const 110) (i32.const 9)))
    ;; a line below the level is dropped in the guest's store, its pointer never followed
    (drop (call $log (i32.const 0) (i32.const 70000) (i32.const 10)))
    (i32.const 0)))"""


@pytest.mark.parametrize(
    ("level", "expected"), [("INFO", ["info-line"]), ("DEBUG", ["debug-line", "info-line"])]
)
def test_log_lines_below_the_proxy_level_never_reach_the_host(level, expected, caplog):
    import logging

    from pyproxy.filters.wasm import WasmFactory

    from pyproxy.chain.api import FactoryContext, HeaderMap

    caplog.set_level(getattr(logging, level), logger="pyproxy.wasm")
    config = WasmFactory.validate({"code_wat": LOGS_AT_TWO_LEVELS, "name": "lv"})
    factory = WasmFactory(config, FactoryContext(None, "main", "http"))
    try:
        instance = factory.create()
        instance.callbacks = _Replies()
        caplog.clear()
        instance.decode_headers(HeaderMap([], {b":method": b"GET", b":path": b"/"}), True)
        lines = [r.getMessage().removeprefix("wasm filter lv: ") for r in caplog.records]
        assert lines == expected
        # Host calls in that entry: only the lines logged (the dropped ones stayed in wasm).
        assert factory.runtime.host_calls == len(expected)
    finally:
        factory.close()


# Appends to the response body without removing content-length: the host refuses (BAD_ARGUMENT,
# else the module traps), since the head announcing the old length is already on its way.
LENGTH_KEPT = """(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "xxyy")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (if (i32.eqz (local.get 1)) (then (return (i32.const 0))))  ;; the empty end-of-stream call
    (if (i32.ne (call $set (i32.const 1) (local.get 1) (i32.const 0) (i32.const 100) (i32.const 2))
          (i32.const 2)) (then unreachable))
    ;; the same length is fine: the first two bytes become "yy"
    (if (i32.ne (call $set (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 102) (i32.const 2))
          (i32.const 0)) (then unreachable))
    (i32.const 0)))"""


def test_a_body_change_that_breaks_content_length_is_refused(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "keep", LENGTH_KEPT)
    for _ in range(2):
        run = curl("-i", f"http://127.0.0.1:{port}/other")
        assert run.stdout, (run, proxy.output)
        status, headers, body = split_response(run.stdout)
        assert (status, headers["content-length"], body) == (200, "12", b"yy:/other:up")
    assert proxy.listener()["filters"]["keep"]["traps"] == 0
    assert "Traceback" not in proxy.output, proxy.output


# proxy_close_stream: the request header `x-close` says which stream the guest closes: "q" the
# request (in proxy_on_request_headers), "s" the response (in proxy_on_response_headers, read
# from the request's headers). 2 and 3 (TCP streams) are no-ops in an HTTP context; 9 is none.
CLOSE_STREAM = (
    """(module
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) "x-close")
  (func $expect (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func $asked (param $which i32) (result i32)
    (if (i32.ne (call $get (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 200)
      (i32.const 204)) (i32.const 0)) (then (return (i32.const 0))))
    (i32.eq (i32.load8_u (i32.load (i32.const 200))) (local.get $which)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $expect (call $close (i32.const 2)) (i32.const 0))
    (call $expect (call $close (i32.const 3)) (i32.const 0))
    (call $expect (call $close (i32.const 9)) (i32.const 2))
    (if (call $asked (i32.const 113)) (then (call $expect (call $close (i32.const 0)) (i32.const 0))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (call $asked (i32.const 115)) (then (call $expect (call $close (i32.const 1)) (i32.const 0))))
    (i32.const 0)))"""
)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_close_stream_resets_the_request_or_the_response(start_proxy, tmp_path, http2):
    upstream = HttpUpstream()
    try:
        proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "closer", CLOSE_STREAM)
        url = f"http://127.0.0.1:{port}/echo"
        version = ["--http2-prior-knowledge"] if http2 else []
        for _ in range(2):  # the connection's next request (HTTP/1: a new one) is served
            run = curl("-i", *version, "-H", "x-close: q", url)
            assert run.returncode != 0 and not run.stdout, run  # reset, no response
            assert upstream.requests == []  # closed before it went upstream
            run = curl("-i", *version, "-H", "x-close: s", url)
            assert run.returncode != 0 and b"200" not in run.stdout, run
            assert len(upstream.requests) == 1  # the upstream answered; the response was reset
            upstream.requests.clear()
            assert split_response(curl("-i", *version, url).stdout)[0] == 200
            upstream.requests.clear()
        # Both streams are two trap-free resets each time: no trap, no local reply.
        counters = proxy.listener()["filters"]["closer"]
        assert (counters["traps"], counters["local_replies"]) == (0, 0)
    finally:
        upstream.close()


# proxy_clear_route_cache: the guest rewrites :path to /v2/x and clears the route cache, then
# reads route_name into a request header: the request is routed (and named) by the new path.
CLEAR_ROUTE = (
    """(module
  (import "env" "proxy_replace_header_map_value"
    (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_clear_route_cache" (func $clear (result i32)))
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) ":path/v2/xroute_namex-route")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $replace (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 105) (i32.const 5)))
    (drop (call $clear))
    (drop (call $property (i32.const 110) (i32.const 10) (i32.const 200) (i32.const 204)))
    (drop (call $add (i32.const 0) (i32.const 120) (i32.const 7)
      (i32.load (i32.const 200)) (i32.load (i32.const 204))))
    (i32.const 0)))"""
)


def test_clear_route_cache_routes_the_rewritten_request_anew(start_proxy, tmp_path):
    default, v2 = HttpUpstream(), HttpUpstream()
    body = (
        "    routes:\n"
        "      - {name: v2-route, match: {prefix: /v2}, cluster: v2}\n"
        "      - {name: default, match: {prefix: /}}\n"
        "    filters:" + _wasm("router", f"code_wat: {json.dumps(CLEAR_ROUTE)}")
    )
    top = f"clusters:\n  v2:\n    endpoints: [{v2.address}]\n"
    try:
        proxy, port = start_listener(start_proxy, tmp_path, default.address, body, top=top)
        curl(f"http://127.0.0.1:{port}/echo")
        assert not default.requests and len(v2.requests) == 1, proxy.output
        assert v2.requests[0]["path"] == "/v2/x"
        assert dict(v2.requests[0]["headers"])["x-route"] == "v2-route"
    finally:
        default.close()
        v2.close()


# Metadata callbacks: Envoy calls them only for HTTP/2 METADATA frames, which its codec drops
# unless allow_metadata is set, and pyproxy's codecs drop. A module exporting them loads and
# serves; they trap if ever called.
METADATA_CALLBACKS = (
    """(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) "x-seen1")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 106) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_request_metadata") (param i32 i32) (result i32) unreachable)
  (func (export "proxy_on_response_metadata") (param i32 i32) (result i32) unreachable))"""
)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_module_with_metadata_callbacks_loads_and_serves(start_proxy, tmp_path, upstream, http2):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "meta", METADATA_CALLBACKS)
    version = ["--http2-prior-knowledge"] if http2 else []
    status, _, body = split_response(curl("-i", *version, f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 200 and ["x-seen", "1"] in json.loads(body)["headers"]
    assert proxy.listener()["filters"]["meta"]["traps"] == 0


# A header-only module (so the native lane may carry its requests): the response gets the
# cluster_name attribute; proxy_on_log logs whether request.duration is known by then.
DURATION = (
    """(module
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  (data (i32.const 100) "request\\00durationcluster_namex-clusterduration known")
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $property (i32.const 116) (i32.const 12) (i32.const 200) (i32.const 204)))
    (drop (call $add (i32.const 2) (i32.const 128) (i32.const 9)
      (i32.load (i32.const 200)) (i32.load (i32.const 204))))
    (i32.const 0))
  (func (export "proxy_on_log") (param i32)
    (if (i32.eqz (call $property (i32.const 100) (i32.const 16) (i32.const 200) (i32.const 204)))
      (then (if (i64.gt_s (i64.load (i32.load (i32.const 200))) (i64.const 0)) (then
        (drop (call $log (i32.const 2) (i32.const 137) (i32.const 14)))))))))"""
)


def test_duration_and_cluster_on_a_header_only_module(start_proxy, tmp_path, upstream):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "dur", DURATION)
    for _ in range(3):  # on one connection's lane and on new ones
        status, headers, _ = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
        assert (status, headers["x-cluster"]) == (200, "main-upstream")
    deadline = time.monotonic() + 3
    while proxy.output.count("duration known") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.output.count("duration known") == 3, proxy.output


# Host reads of guest memory: in bounds, past the end (refused, nothing read), and in a page the
# guest grew during the same entry (the host sees the memory as it is at each call).
GROWS_MEMORY = """(module
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "x-first")
  (data (i32.const 120) "one")
  (data (i32.const 130) "x-grown")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.ne (call $add (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 120) (i32.const 3))
          (i32.const 0)) (then unreachable))
    (if (i32.ne (call $add (i32.const 0) (i32.const 70000) (i32.const 7) (i32.const 120) (i32.const 3))
          (i32.const 6)) (then unreachable))  ;; INVALID_MEMORY_ACCESS: past the one page
    (drop (memory.grow (i32.const 1)))
    (memory.copy (i32.const 70000) (i32.const 130) (i32.const 7))
    (if (i32.ne (call $add (i32.const 0) (i32.const 70000) (i32.const 7) (i32.const 120) (i32.const 3))
          (i32.const 0)) (then unreachable))
    (i32.const 0)))"""


def test_host_calls_see_guest_memory_as_it_is_at_each_call():
    from pyproxy.filters.wasm import WasmFactory
    from pyproxy.filters.wasm_runtime import TRAPS

    from pyproxy.chain.api import FactoryContext, HeaderMap

    config = WasmFactory.validate({"code_wat": GROWS_MEMORY, "name": "grows"})
    factory = WasmFactory(config, FactoryContext(None, "main", "http"))
    try:
        instance = factory.create()
        instance.callbacks = replies = _Replies()
        headers = HeaderMap([], {b":method": b"GET", b":path": b"/"})
        instance.decode_headers(headers, True)
        assert replies.sent == [] and factory.counters[TRAPS] == 0
        assert headers.headers == [(b"x-first", b"one"), (b"x-grown", b"one")]
    finally:
        factory.close()


# Header edits, whose plain case the native crossing does without entering Python: a mixed-case
# name is lower-cased (on the response too, where HTTP/1 shows it), replace drops every field of that name (the request carries two) and
# appends one, and what HeaderMap refuses (a CR in a name, an LF in a value) or keeps apart (a
# pseudo-header) is answered as the Python host function answers it. Each answer is reported
# in a response header (two digits per call), so both paths are held to the same statuses.
HEADER_EDITS = (
    """(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value"
    (func $replace (param i32 i32 i32 i32 i32) (result i32)))
"""
    + _GUEST.format(pages=1)
    + """
  ;; 100 X-Mixed, 107 a, 108 x-dup, 113 one, 120 x-bzd, 126 aza, 130 :path, 135 /echo, 150 x-statuses
  (data (i32.const 100) "X-Mixedax-dupone....x-bzd.aza.:path/echo..........x-statuses")
  (global $at (mut i32) (i32.const 300))
  (func $note (param i32)
    (i32.store8 (global.get $at) (i32.add (i32.const 48) (i32.div_u (local.get 0) (i32.const 10))))
    (i32.store8 (i32.add (global.get $at) (i32.const 1))
      (i32.add (i32.const 48) (i32.rem_u (local.get 0) (i32.const 10))))
    (global.set $at (i32.add (global.get $at) (i32.const 2))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $note (call $add (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 107) (i32.const 1)))
    (call $note (call $replace (i32.const 0) (i32.const 108) (i32.const 5) (i32.const 113) (i32.const 3)))
    (i32.store8 (i32.const 123) (i32.const 13))  ;; "x-b\\rd": a CR inside the name
    (call $note (call $add (i32.const 0) (i32.const 120) (i32.const 5) (i32.const 107) (i32.const 1)))
    (i32.store8 (i32.const 127) (i32.const 10))  ;; "a\\na": an LF inside the value
    (call $note (call $add (i32.const 0) (i32.const 107) (i32.const 1) (i32.const 126) (i32.const 3)))
    (call $note (call $replace (i32.const 0) (i32.const 130) (i32.const 5) (i32.const 135) (i32.const 5)))
    (call $note (call $add (i32.const 9) (i32.const 100) (i32.const 7) (i32.const 107) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 150) (i32.const 10) (i32.const 300)
      (i32.sub (global.get $at) (i32.const 300))))
    (drop (call $add (i32.const 2) (i32.const 100) (i32.const 7) (i32.const 107) (i32.const 1)))
    (global.set $at (i32.const 300))
    (i32.const 0)))"""
)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_header_edits_plain_and_refused_answer_as_the_host_does(
    start_proxy, tmp_path, upstream, http2
):
    proxy, port = _proxy_wat(start_proxy, tmp_path, upstream.address, "edits", HEADER_EDITS)
    version = ["--http2-prior-knowledge"] if http2 else []
    for _ in range(3):  # the first request on the general path, the next ones on the native lane
        run = curl("-i", *version, "-H", "x-dup: 1", "-H", "x-dup: 2", f"http://127.0.0.1:{port}/x")
        status, headers, body = split_response(run.stdout)
        assert status == 200, proxy.output
        sent = json.loads(body)
        assert sent["target"] == "/echo"  # the pseudo-header replaced (the Python host function)
        fields = [tuple(f) for f in sent["headers"]]
        assert ("x-mixed", "a") in fields and ("x-dup", "one") in fields
        assert [f for f in fields if f[0] == "x-dup"] == [("x-dup", "one")]
        assert not any("\r" in k or "\n" in v for k, v in fields)
        assert b"\nx-mixed: a\r\n" in run.stdout.lower() and b"X-Mixed" not in run.stdout
        # OK, OK, BAD_ARGUMENT (CR in a name), BAD_ARGUMENT (LF in a value), OK (:path),
        # BAD_ARGUMENT (map 9 does not exist).
        assert headers["x-statuses"] == "000002020002", headers
    assert proxy.listener()["filters"]["edits"]["traps"] == 0


# A guest that acts in one hook (`where`: 1 request headers, 2 response headers, 3 response
# body) as `mode` says: 1 pause, 2 a local reply (403), 3 a trap, 4 run away; else continue.
_ACTOR = """(module
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "deniedx-seen")
  (global $mode (mut i32) (i32.const 0))
  (global $where (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "act") (param i32 i32) (global.set $mode (local.get 0)) (global.set $where (local.get 1)))
  (func $hook (param $at i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 6) (i32.const 6) (i32.const 0) (i32.const 6)))
    (if (i32.ne (global.get $where) (local.get $at)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 1))))
    (if (i32.eq (global.get $mode) (i32.const 2))
      (then (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0)
        (i32.const 6) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (if (i32.eq (global.get $mode) (i32.const 3)) (then unreachable))
    (if (i32.eq (global.get $mode) (i32.const 4)) (then (loop $spin (br $spin))))
    (i32.const 0))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $hook (i32.const 1)))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $hook (i32.const 2)))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (call $hook (i32.const 3)))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1)))"""


def _act(python_path: bool, monkeypatch, mode: int, where: int) -> list:
    """One request through _ACTOR's hooks, as a chain of one filter runs them (stopping at the
    first hook that does not continue): what the host did, on the native or the Python path."""
    import asyncio

    from pyproxy.filters import wasm_runtime
    from pyproxy.filters.wasm import WasmFactory

    from pyproxy.chain.api import FactoryContext, HeaderMap

    if python_path:  # every entry a hook begins, through the Python crossing
        monkeypatch.setattr(wasm_runtime, "_enter_hook", wasm_runtime._enter_hook_ctypes)
    validated = WasmFactory.validate({"code_wat": _ACTOR, "call_time_limit": "50ms"})
    factory = WasmFactory(validated, FactoryContext(None, "main", "http"))
    rt = factory.runtime
    loop = asyncio.new_event_loop()
    try:
        rt.instance.exports(rt.store)["act"](rt.store, mode, where)
        instance = factory.create()
        instance.callbacks = replies = _Replies()
        replies.loop = loop  # type: ignore[attr-defined]
        request = HeaderMap([(b"host", b"x")], {b":method": b"GET", b":path": b"/"})
        response = HeaderMap([(b"content-length", b"2")], {b":status": b"200"})
        entries = rt.time_limit.entries
        statuses = []
        for hook, payload, end in (
            (instance.decode_headers, request, True),
            (instance.encode_headers, response, False),
            (instance.encode_data, b"ok", True),
        ):
            statuses.append(hook(payload, end))
            if statuses[-1] != 0:
                break
        seen = (rt.filter is instance, rt.host_calls, rt.host_bytes)
        instance.on_destroy()
        return [
            statuses, replies.sent, list(factory.counters), instance.paused, seen,
            rt.time_limit.entries - entries, rt.filter, request.headers, response.headers,
        ]  # fmt: skip
    finally:
        loop.close()
        factory.close()


@pytest.mark.parametrize(
    ("mode", "where"),
    [(0, 0), (1, 1), (1, 2), (2, 1), (2, 3), (3, 1), (3, 2), (4, 1), (4, 3)],
    ids=["through", "pause-request", "pause-response", "reply-request", "reply-body",
         "trap-request", "trap-response", "runaway-request", "runaway-body"],
)  # fmt: skip
def test_native_hook_entry_answers_as_the_python_one(monkeypatch, mode, where):
    """Runtime.enter (native/wasm_call.c's enter: the entry's bookkeeping and the guest call in
    one crossing, the state in EntryState fields) does what its Python form does, through a
    request that continues, pauses, replies, traps or runs past call_time_limit."""
    from pyproxy.filters import wasm_runtime

    if wasm_runtime._wasmcall is None:
        pytest.skip("the native crossing is not built")
    native = _act(False, monkeypatch, mode, where)
    python = _act(True, monkeypatch, mode, where)
    assert native == python
    if mode == 4:
        assert native[2][1] == 1  # over_time_limit
    if mode == 0:
        # Each hook's entry its own budget: one header added in each, one counted in the last.
        assert native[0] == [0, 0, 0] and native[7].count((b"x-seen", b"denied")) == 3
        assert native[4] == (True, 1, 12) and native[5] == 4
