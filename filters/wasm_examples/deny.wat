;; Answers 403 itself (proxy_send_local_response) when the request carries an `x-deny` header.
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))

  (data (i32.const 0) "x-deny")                ;; 6
  (data (i32.const 16) "denied by wasm\n")     ;; 15
  (data (i32.const 32) "wasm_denied")          ;; 11: status code details
  ;; serialized headers {"x-wasm-deny": "1"}: count, (key length, value length), key NUL value NUL
  (data (i32.const 64) "\01\00\00\00" "\0b\00\00\00" "\01\00\00\00" "x-wasm-deny\00" "1\00") ;; 26
  ;; 256, 260: out-params

  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 4096))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 256) (i32.const 260)))
      (then
        (drop (call $reply (i32.const 403) (i32.const 32) (i32.const 11) (i32.const 16) (i32.const 15)
                           (i32.const 64) (i32.const 26) (i32.const -1)))
        (return (i32.const 1))))  ;; Pause: the local response is the answer
    (i32.const 0)))
