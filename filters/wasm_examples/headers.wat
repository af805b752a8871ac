;; Edits headers both ways through the Proxy-Wasm ABI: logs its configuration, adds, replaces and removes
;; request headers, and adds response headers (one of them copied from a value it reads back).
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))

  (data (i32.const 0) "x-wasm-added")        ;; 12
  (data (i32.const 16) "yes")                ;; 3
  (data (i32.const 32) "x-wasm-replace")     ;; 14
  (data (i32.const 48) "replaced")           ;; 8
  (data (i32.const 64) "x-wasm-remove")      ;; 13
  (data (i32.const 80) "x-wasm-response")    ;; 15
  (data (i32.const 96) "hello")              ;; 5
  (data (i32.const 112) "content-type")      ;; 12
  (data (i32.const 128) "x-wasm-saw-content-type") ;; 23
  (data (i32.const 160) "headers example configured: ") ;; 28
  ;; 256, 260: out-params (pointer, size) for values the host returns

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    ;; grow when the bump pointer passes the end (one page at a time is plenty here)
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.const 1)))))
    (local.get $ptr))

  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))

  ;; Read the plugin configuration (buffer 7) and log it after a fixed prefix.
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $msg i32)
    (global.set $heap (i32.const 4096))
    (drop (call $get_buffer (i32.const 7) (i32.const 0) (local.get $size) (i32.const 256) (i32.const 260)))
    ;; message = prefix + configuration, built at 1024
    (memory.copy (i32.const 1024) (i32.const 160) (i32.const 28))
    (memory.copy (i32.const 1052) (i32.load (i32.const 256)) (i32.load (i32.const 260)))
    (drop (call $log (i32.const 2) (i32.const 1024) (i32.add (i32.const 28) (i32.load (i32.const 260)))))
    (i32.const 1))

  (func (export "proxy_on_context_create") (param i32 i32))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 4096))
    (drop (call $add (i32.const 0) (i32.const 0) (i32.const 12) (i32.const 16) (i32.const 3)))
    (drop (call $replace (i32.const 0) (i32.const 32) (i32.const 14) (i32.const 48) (i32.const 8)))
    (drop (call $remove (i32.const 0) (i32.const 64) (i32.const 13)))
    (i32.const 0))

  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (global.set $heap (i32.const 4096))
    (drop (call $add (i32.const 2) (i32.const 80) (i32.const 15) (i32.const 96) (i32.const 5)))
    (if (i32.eqz (call $get (i32.const 2) (i32.const 112) (i32.const 12) (i32.const 256) (i32.const 260)))
      (then
        (drop (call $add (i32.const 2) (i32.const 128) (i32.const 23)
                         (i32.load (i32.const 256)) (i32.load (i32.const 260))))))
    (i32.const 0))

  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))
