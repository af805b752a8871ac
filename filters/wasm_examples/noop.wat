;; A no-op Proxy-Wasm (ABI v0.2.1) filter: every callback answers Continue. Used to measure the host's own cost.
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))

  (func (export "proxy_abi_version_0_2_1"))

  ;; A bump allocator; nothing here keeps memory across callbacks.
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))

  (func (export "proxy_on_vm_start") (param $root i32) (param $size i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (i32.const 0))
  (func (export "proxy_on_done") (param $ctx i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param $ctx i32)))
