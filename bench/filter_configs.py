"""Filter entries for the benches: each runs on every request and never acts (nothing limited,
delayed or refused), so what a bench measures is the filter's cost and the path it puts the
request on."""

from __future__ import annotations

from pathlib import Path

from pyproxy.filters import sdk_modules

WASM_NOOP = Path(__file__).resolve().parent.parent / "filters" / "wasm_examples" / "noop.wat"
BENCH_HEADER = ("x-bench", "1")  # the header the one-line header filters add


def filter_entry(kind: str, workdir: Path, config_name: str) -> dict:
    """One filter, configured so it runs on every request and never acts."""
    if kind == "fault":
        config = {
            "delay": {"fixed_delay": "10ms", "percentage": 0},
            "abort": {"http_status": 503, "percentage": 0},
        }
    elif kind == "ratelimit":
        config = {
            "token_bucket": {
                "max_tokens": 10**9,
                "tokens_per_fill": 10**9,
                "fill_interval": "1s",
            }
        }
    elif kind == "tap":
        config = {"path": str(workdir / f"tap-{config_name}.jsonl"), "max_body_bytes": 1024}
    elif kind == "lua":
        config = {"inline_code": "function envoy_on_request(handle)\nend\n"}
    elif kind == "wasm":
        config = {"wasm_file": str(WASM_NOOP)}
    elif kind == "wasm_sdk":
        module = sdk_modules.assemblyscript_module("headers")
        config = {"wasm_file": str(module), "root_id": "add_header", "configuration": "bench"}
        return {"name": kind, "type": "wasm", "config": config}
    else:
        raise ValueError(kind)
    return {"name": kind, "type": kind, "config": config}


def lua_header_entry(side: str) -> dict:
    """A one-line Lua filter adding BENCH_HEADER to the request or to the response."""
    hook = {"request": "envoy_on_request", "response": "envoy_on_response"}[side]
    name, value = BENCH_HEADER
    code = f'function {hook}(handle)\n  handle:headers():add("{name}", "{value}")\nend\n'
    return {"name": "lua", "type": "lua", "config": {"inline_code": code}}
