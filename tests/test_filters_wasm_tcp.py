"""The wasm filter on a TCP listener, through a real pyproxy and a real echo upstream: Envoy's
network-filter callbacks (new connection, downstream and upstream data, both closes), Pause and
proxy_continue_stream, the data buffers read and written, and proxy_close_stream."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import free_port, start_listener

pytest.importorskip("wasmtime")

# On a new connection: Pause, and a tick (20 ms) resumes it through proxy_continue_stream
# (DOWNSTREAM) on that context. Downstream data: "quit..." closes the connection
# (proxy_close_stream DOWNSTREAM); a read that does not end in "\n" is held (Pause) until one
# does; then the held bytes go on wrapped in [ ]. Upstream data: each read gets "<" in front.
# Each close callback logs its side and peer type; proxy_on_log logs the context's end.
TCP_MODULE = """(module
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $waiting (mut i32) (i32.const 0))
  (data (i32.const 100) "[]<")
  ;; log lines: down-close local 300, remote 316; up-close local 333, remote 347; 362, 369
  (data (i32.const 300) "down-close localdown-close remoteup-close localup-close remotetcp-logresumed")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func $expect (param $got i32) (param $want i32)
    (if (i32.ne (local.get $got) (local.get $want)) (then unreachable)))
  (func (export "proxy_on_new_connection") (param $ctx i32) (result i32)
    (global.set $waiting (local.get $ctx))
    (drop (call $tick (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (i32.eqz (global.get $waiting)) (then (return)))
    (call $expect (call $effective (global.get $waiting)) (i32.const 0))
    (call $expect (call $continue (i32.const 2)) (i32.const 0))
    (call $expect (call $continue (i32.const 3)) (i32.const 12))
    (global.set $waiting (i32.const 0))
    (drop (call $log (i32.const 2) (i32.const 369) (i32.const 7))))
  (func (export "proxy_on_downstream_data") (param $ctx i32) (param $size i32) (param $eos i32)
    (result i32)
    (local $p i32)
    (if (i32.eqz (local.get $size)) (then (return (i32.const 0))))
    (call $expect (call $get (i32.const 2) (i32.const 0) (local.get $size) (i32.const 40)
      (i32.const 44)) (i32.const 0))
    (call $expect (i32.load (i32.const 44)) (local.get $size))
    (local.set $p (i32.load (i32.const 40)))
    (if (i32.and (i32.ge_u (local.get $size) (i32.const 4))
          (i32.eq (i32.load (local.get $p)) (i32.const 0x74697571)))  ;; "quit"
      (then (call $expect (call $close (i32.const 2)) (i32.const 0)) (return (i32.const 0))))
    (if (i32.and (i32.eqz (local.get $eos))
          (i32.ne (i32.load8_u (i32.add (local.get $p) (i32.sub (local.get $size) (i32.const 1))))
            (i32.const 10)))
      (then (return (i32.const 1))))
    (call $expect (call $set (i32.const 2) (i32.const 0) (i32.const 0) (i32.const 100)
      (i32.const 1)) (i32.const 0))
    (call $expect (call $set (i32.const 2) (i32.add (local.get $size) (i32.const 1)) (i32.const 0)
      (i32.const 101) (i32.const 1)) (i32.const 0))
    (i32.const 0))
  (func (export "proxy_on_upstream_data") (param $ctx i32) (param $size i32) (param $eos i32)
    (result i32)
    (if (local.get $size)
      (then (call $expect (call $set (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 102)
        (i32.const 1)) (i32.const 0))))
    ;; the downstream buffer is not this callback's
    (call $expect (call $get (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 40)
      (i32.const 44)) (i32.const 1))
    (i32.const 0))
  (func (export "proxy_on_downstream_connection_close") (param $ctx i32) (param $peer i32)
    (if (i32.eq (local.get $peer) (i32.const 1))
      (then (drop (call $log (i32.const 2) (i32.const 300) (i32.const 16))))
      (else (drop (call $log (i32.const 2) (i32.const 316) (i32.const 17))))))
  (func (export "proxy_on_upstream_connection_close") (param $ctx i32) (param $peer i32)
    (if (i32.eq (local.get $peer) (i32.const 1))
      (then (drop (call $log (i32.const 2) (i32.const 333) (i32.const 14))))
      (else (drop (call $log (i32.const 2) (i32.const 347) (i32.const 15))))))
  (func (export "proxy_on_log") (param i32)
    (drop (call $log (i32.const 2) (i32.const 362) (i32.const 7)))))"""


def _proxy(start_proxy, tmp_path, upstream: str):
    body = f"""    filters:
      - name: tcpwasm
        type: wasm
        config:
          code_wat: {json.dumps(TCP_MODULE)}
"""
    return start_listener(start_proxy, tmp_path, upstream, body, mode="tcp", port=free_port())


def _wait_for(proxy, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while proxy.output.count(text) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.output.count(text) >= count, proxy.output


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_tcp_callbacks_hold_edit_and_resume_the_stream(start_proxy, tmp_path, echo_server):
    proxy, port = _proxy(start_proxy, tmp_path, echo_server.address)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"ab")  # waits for the tick to let the connection on, then is held
        time.sleep(0.1)
        client.sendall(b"c\n")
        client.settimeout(5)
        got = b""
        while got.replace(b"<", b"") != b"[abc\n]":
            chunk = client.recv(100)
            assert chunk, got
            got += chunk
        assert got.startswith(b"<")  # the upstream's read, edited on its way back
        client.shutdown(socket.SHUT_WR)
        assert _read_until_closed(client) == b""
    _wait_for(proxy, "resumed")
    _wait_for(proxy, "tcp-log")
    assert "down-close remote" in proxy.output and "up-close remote" in proxy.output
    assert proxy.listener()["filters"]["tcpwasm"]["traps"] == 0


def test_tcp_bytes_held_at_eof_go_on_before_the_fin(start_proxy, tmp_path, echo_server):
    proxy, port = _proxy(start_proxy, tmp_path, echo_server.address)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"no newline")
        client.shutdown(socket.SHUT_WR)  # end of stream: the guest lets the bytes go
        assert _read_until_closed(client).replace(b"<", b"") == b"[no newline]"


def test_tcp_close_stream_closes_the_connection(start_proxy, tmp_path, echo_server):
    proxy, port = _proxy(start_proxy, tmp_path, echo_server.address)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"quit\n")
        assert _read_until_closed(client) == b""  # closed by the proxy, nothing echoed
    _wait_for(proxy, "down-close local")
    _wait_for(proxy, "tcp-log")


def test_sdk_built_tcp_filter_edits_and_counts_the_stream(start_proxy, tmp_path, echo_server):
    """The AssemblyScript SDK's network-filter callbacks (filters/wasm_examples/assemblyscript/
    assembly/tcp.ts): the downstream's bytes reach the upstream upper-cased."""
    from wasm_sdk import assemblyscript_module

    wasm = assemblyscript_module("tcp")
    body = f"""    filters:
      - name: tcpsdk
        type: wasm
        config:
          root_id: tcp
          configuration: enabled
          vm_config: {{code: {{local: {{filename: {wasm}}}}}}}
"""
    proxy, port = start_listener(start_proxy, tmp_path, echo_server.address, body, mode="tcp")
    payload = b"hello, tcp world\n" * 1000
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert _read_until_closed(client) == payload.upper()
    _wait_for(proxy, f"up {len(payload)} down {len(payload)}")
    assert "tcp: new connection" in proxy.output
    assert "tcp: downstream closed, peer 2" in proxy.output
