"""A response through a chain of one filter with both response hooks, on the native pair: the
response hook runs the filter's head hook and its body hook in one step
(HttpChain.encode_whole). Whatever is not plain — the head answered, paused or given a status
the pair cannot write, the body changed or held — goes on as it did before the step existed:
each case runs on one connection paired (`express_lane: native`) and on the general path
(`off`), and the client and the app must see the same messages, the listener the same
counters; a body callback after a head that did not go on would trap (and be counted).
"""

from __future__ import annotations

import pytest
from test_native_lane import CATCH_ALL, _both_lanes, lane_listener
from test_native_lane_bodies import read_to_the_end

pytest.importorskip("wasmtime")

# The request's x-case header (read in proxy_on_request_headers) picks what the module does:
#   (none) both callbacks go on;  r  the head answers 403 (and returns Continue);
#   p  the head pauses (never resumed);  s  the head's :status becomes 201;
#   b  the body's first two bytes become "OK";  h  the body pauses at its end (never resumed).
# proxy_on_response_body traps for r and p: it must not be called after such a head.
CASES_WAT = r"""
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (global $case (mut i32) (i32.const 0))
  (data (i32.const 0) "x-case")          ;; 6
  (data (i32.const 16) "head said no\n") ;; 13
  (data (i32.const 32) ":status")        ;; 7
  (data (i32.const 48) "201")            ;; 3
  (data (i32.const 64) "OK")             ;; 2
  ;; 80: no header pairs (a count of zero)
  ;; 256, 260: where the host writes a value's pointer and size
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 4096))
    (global.set $case (i32.const 0))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 256) (i32.const 260)))
      (then (global.set $case (i32.load8_u (i32.load (i32.const 256))))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eq (global.get $case) (i32.const 114)) ;; r
      (then
        (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 13)
                           (i32.const 80) (i32.const 4) (i32.const -1)))
        (return (i32.const 0))))
    (if (i32.eq (global.get $case) (i32.const 112)) ;; p
      (then (return (i32.const 1))))
    (if (i32.eq (global.get $case) (i32.const 115)) ;; s
      (then (drop (call $replace (i32.const 2) (i32.const 32) (i32.const 7) (i32.const 48) (i32.const 3)))))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eq (global.get $case) (i32.const 114)) (then (unreachable)))
    (if (i32.eq (global.get $case) (i32.const 112)) (then (unreachable)))
    (if (i32.eq (global.get $case) (i32.const 98)) ;; b
      (then (drop (call $set_buffer (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 64) (i32.const 2)))))
    (if (i32.eq (global.get $case) (i32.const 104)) ;; h
      (then (return (i32.const 1))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
"""

FILTERS = (
    "      - name: cases\n        type: wasm\n        config:\n"
    "          pause_timeout: 300ms\n          code_wat: |\n"
    + "".join(f"            {line}\n" for line in CASES_WAT.strip().splitlines())
)


def _case(client, case: bytes, path: bytes = b"/x"):
    return client.get(path, b"X-Case: %s\r\n" % case if case else b"")


def _run(start_proxy, tmp_path, case: bytes):
    """Warm-up (pairs the connection), the case, then a plain exchange: the native run's
    (replies, sent, stats), after checking both lanes agree."""

    def script(client):
        return [_case(client, b""), _case(client, case), _case(client, b"", b"/after")]

    runs = _both_lanes(start_proxy, tmp_path, FILTERS, script, CATCH_ALL % "5s", fold_case=True)
    replies, sent, stats = runs["native"]
    assert replies[2][0].startswith(b"http/1.1 200") and replies[2][1] == b"ok:/after"
    assert stats["filters"]["cases"]["traps"] == 0, stats["filters"]
    return replies, sent, stats


def test_head_and_body_that_go_on_are_carried_in_c(start_proxy, tmp_path):
    replies, _, stats = _run(start_proxy, tmp_path, b"")
    assert replies[1] == (replies[1][0], b"ok:/x") and replies[1][0].startswith(b"http/1.1 200")
    assert stats["native_requests"] == 2, stats


def test_a_head_answered_with_continue_never_reaches_the_body_callback(start_proxy, tmp_path):
    replies, _, stats = _run(start_proxy, tmp_path, b"r")
    assert replies[1][0].startswith(b"http/1.1 403") and replies[1][1] == b"head said no\n"


def test_a_paused_head_never_reaches_the_body_callback(start_proxy, tmp_path):
    replies, _, stats = _run(start_proxy, tmp_path, b"p")
    assert replies[1][0].startswith(b"http/1.1 500"), replies[1]


def test_a_status_the_pair_cannot_write_is_taken_after_the_body_went_through(start_proxy, tmp_path):
    """The head's edit is checked after the body hook ran: the Exchange sends the new head and
    the body the hook let through, once."""
    replies, _, stats = _run(start_proxy, tmp_path, b"s")
    assert replies[1][0].startswith(b"http/1.1 201") and replies[1][1] == b"ok:/x"


def test_a_changed_body_is_taken_and_sent_as_changed(start_proxy, tmp_path):
    replies, _, stats = _run(start_proxy, tmp_path, b"b")
    assert replies[1][0].startswith(b"http/1.1 200") and replies[1][1] == b"OK:/x"


def test_a_held_body_is_taken_and_reset_when_the_pause_times_out(start_proxy, tmp_path):
    """The head went on before the body was held: as on the general path, the pause timeout's
    answer comes too late to replace the response, and the downstream is reset."""
    outcomes = {}
    for lane in ("native", "off"):
        _, proxy, client = lane_listener(start_proxy, tmp_path, lane, FILTERS, CATCH_ALL % "5s")
        assert client.get(b"/warm")[1] == b"ok:/warm"
        client.send(b"GET /held HTTP/1.1\r\nHost: svc\r\nX-Case: h\r\n\r\n")
        received = read_to_the_end(client)
        stats = proxy.wait_for(lambda s: s["requests"] == 2)
        outcomes[lane] = (received, stats["flags"], stats["responses"], stats["filters"])
        client.close()
    assert outcomes["native"] == outcomes["off"]
    assert outcomes["native"][3]["cases"]["pause_timeouts"] == 1
