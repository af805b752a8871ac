"""The Lua filter: runs Envoy-style `envoy_on_request` / `envoy_on_response` scripts in a sandboxed lupa runtime.

Config (Envoy's name for the code):

    inline_code: |            # or source_file: /path/to/script.lua (read at config load)
      function envoy_on_request(handle)
        handle:headers():add("x-hello", "world")
      end
    max_instructions: 1000000  # per hook call (and 100 ms CPU); a runaway script gets a 500
    max_memory: 33554432       # bytes, the whole runtime (one per worker)
    max_pattern_steps: 10000000  # worst-case matcher steps of one string.find/match/gmatch/gsub

Design:

- One LuaRuntime per factory (per worker), the script compiled once, LuaJIT if
  lupa ships it (JIT off for script code, so the count hook sees every
  instruction), else the newest PUC Lua.
- The script's globals are an allow-list (no os/io/require/load/debug/package/
  coroutine/collectgarbage); Python objects reachable from Lua are only the
  few primitives below, with attribute access denied.
- The handle, its headers object and the rest are Lua tables built once; their
  methods call a handful of Python primitives that act on "the current
  request" (the factory's `map` / `filter`), so a request costs one
  Python→Lua call plus one Lua→Python call per header operation.
- `handle:body()` must wait for the whole body: scripts that mention `body`
  run their handlers in a coroutine that yields; the hook returns
  STOP_AND_BUFFER and the chain calls the data hook once the body is complete,
  which resumes it. `handle:httpCall()` (synchronous) yields the same way: the
  call goes to a configured cluster (filters/callout.py) and its answer resumes
  the script. Scripts that mention neither call straight through and have no
  data hooks at all.
- Dynamic metadata lives on the request's chain (`dynamic_metadata`), so later
  filters and the response handler see what the request handler set. A handle
  method Envoy has and pyproxy lacks is a script error naming it.
- A script error or the instruction limit answers 500 and logs one line (at
  most one per second per filter, with a count of what was suppressed).
- What the hook cannot stop is priced instead: Lua's pattern matcher backtracks
  in C, so string.find/match/gmatch/gsub are wrapped and a call whose worst
  case (see pattern_shape) exceeds max_pattern_steps is a script error; header
  bytes handed to Python are capped per call (MAX_ADDED_HEADER_BYTES), outside
  the Lua memory cap.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import logging
import re
import time
from collections.abc import Coroutine
from typing import Any

from pyproxy.filters.callout import CalloutError, CallResult, http_call

from pyproxy.chain.api import (
    CONTINUE,
    STOP,
    STOP_AND_BUFFER,
    FilterConfigError,
    FilterFactory,
    HeaderMap,
    HttpFilter,
    downstream_address,
)

log = logging.getLogger("pyproxy.filters.lua")

DEFAULT_MAX_INSTRUCTIONS = 1_000_000
DEFAULT_MAX_MEMORY = 32 * 1024 * 1024
MAX_CPU_SECONDS = 0.1  # per hook call, on top of the instruction limit
# A string.find/match/gmatch/gsub whose worst case exceeds this many matcher steps (~6 ns each)
# is refused before it starts: the matcher runs in C, out of the instruction hook's reach.
DEFAULT_MAX_PATTERN_STEPS = 10_000_000
# Header bytes (names + values) a script may add or replace per hook call: the Lua memory cap
# does not cover what it hands to Python.
MAX_ADDED_HEADER_BYTES = 64 * 1024
ERRORS, TIMEOUTS, REPLIES = range(3)
# Outcome codes returned by the Lua runners (nil means "went through").
_TIMEOUT, _ERROR, _WAITING, _CALLING = 1, 2, 3, 4
MAX_CALL_TIMEOUT = 60.0  # httpCall with no timeout (0) still ends
_LEVELS = {
    0: logging.DEBUG,  # logTrace: Python has no TRACE level
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
    5: logging.CRITICAL,
}
# `handle:body()`, `h.body(h)`, `h["body"]`, and the same for httpCall: only such scripts pay for
# a coroutine and data hooks.
_WAITS = re.compile(
    rb"[:.]\s*(?:body(?:Chunks)?|httpCall)\s*\(|\[\s*[\"'](?:body(?:Chunks)?|httpCall)[\"']\s*\]"
)
_announced = False


def _lupa():
    """The fastest Lua lupa offers here: LuaJIT 2.1, then 2.0, then the newest PUC Lua."""
    for name in ("luajit21", "luajit20", "lua54", "lua53", "lua52", "lua51"):
        try:
            return importlib.import_module(f"lupa.{name}")
        except ImportError:
            continue
    return importlib.import_module("lupa")


def pattern_shape(pattern: bytes) -> tuple[bool, bytes | None, int, int]:
    """What bounds a Lua pattern's matching cost: (anchored, the literal byte every match starts
    with or None, items that may span the subject and backtrack, `?` items).

    A matcher step count is at most starts x (n+1)**spans x 2**optionals: each quantified item
    (`*`, `+`, `-`), %b and back-reference may cover up to n bytes and is retried at every
    length when what follows fails. The last item spans without retries when nothing follows."""
    n = len(pattern)
    anchored = pattern.startswith(b"^")
    i = 1 if anchored else 0
    items: list[tuple[str, bytes | None]] = []  # (kind, literal byte of a single-byte item)
    while i < n:
        c = pattern[i : i + 1]
        literal: bytes | None = None
        if c in (b"(", b")"):  # captures (and position captures) are zero width
            i += 1
            continue
        if c == b"$" and i == n - 1:
            items.append(("end", None))
            break
        if c == b"%":
            d = pattern[i + 1 : i + 2]
            if d == b"b":
                items.append(("span", None))
                i += 4
                continue
            if d == b"f":  # frontier: zero width
                i = _set_end(pattern, i + 2)
                continue
            if d.isdigit():
                items.append(("span", None))
                i += 2
                continue
            literal = None if d.isalpha() else d
            i += 2
        elif c == b"[":
            i = _set_end(pattern, i)
        elif c == b".":
            i += 1
        else:
            literal = c
            i += 1
        quantifier = pattern[i : i + 1]
        if quantifier and quantifier in b"*+-?":
            i += 1
            kind = "optional" if quantifier == b"?" else "span"
            items.append((kind, literal if quantifier == b"+" else None))
        else:
            items.append(("one", literal))
    spans = sum(kind == "span" for kind, _ in items)
    if items and items[-1][0] == "span":
        spans -= 1
    optionals = sum(kind == "optional" for kind, _ in items)
    first = items[0][1] if items and items[0][0] in ("one", "span") else None
    return anchored, first, spans, optionals


def _set_end(pattern: bytes, i: int) -> int:
    """Index after the `[...]` set starting at i (Lua's rules: a `]` right after `[` or `[^`
    is a member; `%` escapes). A set left open runs to the end: the matcher will raise."""
    i += 1
    if pattern[i : i + 1] == b"^":
        i += 1
    first = True
    while i < len(pattern):
        c = pattern[i : i + 1]
        if c == b"]" and not first:
            return i + 1
        i += 2 if c == b"%" else 1
        first = False
    return len(pattern)


def _deny_attributes(obj, name, is_setting):
    # Lua only ever calls the primitives it was given; no attribute walk to Python internals.
    raise AttributeError(name)


# The prelude runs once per runtime. It captures what it needs from the real
# globals, builds the sandbox, compiles the script into it and returns the runners.
_PRELUDE = r"""
local py, code, chunkname, max_instructions = ...
local sethook, getinfo, dgetmt = debug.sethook, debug.getinfo, debug.getmetatable
local co_create, co_resume, co_yield, co_status =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local load, pcall, error, type, tostring, next, setmetatable, select =
  load, pcall, error, type, tostring, next, setmetatable, select
local jit = rawget(_G, "jit")

local py_get, py_get_at, py_count, py_add, py_set, py_remove, py_item =
  py.get, py.get_at, py.count, py.add, py.set, py.remove, py.item
local py_respond, py_log, py_protocol = py.respond, py.log, py.protocol
local py_body_state, py_body_len, py_body_get, py_body_set =
  py.body_state, py.body_len, py.body_get, py.body_set
local py_meta_set, py_meta_get, py_meta_items = py.meta_set, py.meta_get, py.meta_items
local py_address, py_call_start, py_b64, py_now_us = py.address, py.call_start, py.b64, py.now_us
local py_trailers, py_use_trailers, py_route_metadata = py.trailers, py.use_trailers, py.route_metadata
local py_import_key, py_verify, py_route_name = py.import_key, py.verify, py.route_name
local py_filter_context, py_clear_route = py.filter_context, py.clear_route

local function copy(t, skip)
  local c = {}
  for k, v in next, t do
    if not (skip and skip[k]) then c[k] = v end
  end
  return c
end

-- The allow-list.
local safe_string = copy(string, {dump = true})
local env = {
  assert = assert, error = error, ipairs = ipairs, next = next, pcall = pcall,
  xpcall = xpcall, select = select, tonumber = tonumber, tostring = tostring,
  type = type, unpack = rawget(_G, "unpack") or table.unpack, rawequal = rawequal,
  rawget = rawget, rawset = rawset, setmetatable = setmetatable,
  getmetatable = getmetatable, string = safe_string, table = copy(table),
  math = copy(math), os = {time = os.time, clock = os.clock}, _VERSION = _VERSION,
}
if rawget(_G, "bit") then env.bit = copy(bit) end
env._G = env
-- Lua 5.1/LuaJIT's pairs ignores __pairs; Envoy scripts iterate headers with pairs().
env.pairs = function(t)
  local mt = dgetmt(t)
  local p = type(mt) == "table" and rawget(mt, "__pairs")
  if p then return p(t) end
  return next, t, nil
end
-- String methods ("x"):rep() go through the string metatable: point it at the safe copy.
local string_mt = dgetmt("")
string_mt.__index = safe_string
string_mt.__metatable = false

-- Instruction limit: a count hook. Once it fires it fires on every instruction,
-- so a script's own pcall cannot swallow it; our runners' epilogues are exempt.
local LIMIT = setmetatable({}, {__tostring = function() return "instruction limit exceeded" end})
local RESPONDED = {}
local BODY_WAIT = {}
local CALL_WAIT = {}
-- It fires every PERIOD instructions and also bounds CPU time, since one
-- instruction (string.rep, a Python call) can do much work.
local PERIOD = 200
local MAX_SECONDS = py.max_seconds
local clock = os.clock
local budget = math.max(1, math.floor(max_instructions / PERIOD))
local ours = {}
local expired, ticks, started_at = false, 0, 0
local function hook()
  if not expired then
    ticks = ticks + 1
    if ticks == 1 then started_at = clock() end
    if ticks < budget and clock() - started_at < MAX_SECONDS then return end
    expired = true
    sethook(hook, "", 1)
  end
  local info = getinfo(2, "f")
  if info and ours[info.func] then return end
  error(LIMIT, 0)
end

-- Lua's pattern matcher backtracks in C, where no hook can stop it: ("a"):rep(3000):find(".-.-.-b")
-- would run for hours. Each find/match/gmatch/gsub is priced first (its worst case in matcher
-- steps, from the pattern's shape and the subject's length) and refused past PATTERN_STEPS;
-- one that is allowed but slow ends the run when the CPU time is up.
local PATTERN_STEPS = py.pattern_steps
local py_pattern_shape, py_count_byte = py.pattern_shape, py.count_byte
local s_find, s_match, s_gmatch, s_gsub = string.find, string.match, string.gmatch, string.gsub
local shapes, n_shapes = {}, 0
local function price(s, p, can_anchor)
  if type(s) ~= "string" or type(p) ~= "string" then return 0 end  -- numbers are short
  local shape = shapes[p]
  if shape == nil then
    shape = {py_pattern_shape(p)}
    if n_shapes < 512 then shapes[p], n_shapes = shape, n_shapes + 1 end
  end
  local anchored, literal, spans, optionals = shape[1], shape[2], shape[3], shape[4]
  if spans == 0 and optionals == 0 then return 0 end  -- no backtracking: linear
  local n = #s + 1
  local per_start = n ^ spans * 2 ^ optionals
  local starts = (can_anchor and anchored) and 1 or n
  if starts * per_start > PATTERN_STEPS and starts > 1 and literal then
    starts = py_count_byte(s, literal) + 1  -- only where the first literal occurs
  end
  local cost = starts * per_start
  if cost > PATTERN_STEPS then
    error(("pattern %q costs up to %.3g matcher steps on a %d-byte subject (limit %d): "
      .. "anchor it with ^, start it with a literal, or use find(s, text, 1, true)")
      :format(p, cost, #s, PATTERN_STEPS), 3)
  end
  if ticks == 0 then ticks, started_at = 1, clock() end  -- the run's CPU clock starts now
  return cost
end
local function time_up()
  if clock() - started_at >= MAX_SECONDS then
    expired = true
    sethook(hook, "", 1)
    error(LIMIT, 0)
  end
end
local function after(...)
  time_up()
  return ...
end
safe_string.find = function(s, p, init, plain)
  if plain or price(s, p, true) == 0 then return s_find(s, p, init, plain) end
  return after(s_find(s, p, init))
end
safe_string.match = function(s, p, init)
  if price(s, p, true) == 0 then return s_match(s, p, init) end
  return after(s_match(s, p, init))
end
safe_string.gsub = function(s, p, repl, n)
  if price(s, p, true) == 0 then return s_gsub(s, p, repl, n) end
  return after(s_gsub(s, p, repl, n))
end
safe_string.gmatch = function(s, p)
  if price(s, p, false) == 0 then return s_gmatch(s, p) end
  local it = s_gmatch(s, p)
  return function() return after(it()) end
end

local function outcome(ok, err)
  if ok or err == RESPONDED then return nil end
  if err == LIMIT or expired then return 1 end
  return 2, tostring(err)
end

local function checkstring(v, what)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(what .. ": string expected, got " .. t, 3)
end

-- headers(): one object, acting on whichever message is current.
-- A string argument (the usual case) skips checkstring's call.
local headers_methods = {
  get = function(_, k)
    if type(k) ~= "string" then k = checkstring(k, "get") end
    return py_get(k)
  end,
  getAtIndex = function(_, k, i) return py_get_at(checkstring(k, "getAtIndex"), i) end,
  getNumValues = function(_, k) return py_count(checkstring(k, "getNumValues")) end,
  add = function(_, k, v)
    if type(k) ~= "string" then k = checkstring(k, "add") end
    if type(v) ~= "string" then v = checkstring(v, "add") end
    py_add(k, v)
  end,
  replace = function(_, k, v) py_set(checkstring(k, "replace"), checkstring(v, "replace")) end,
  remove = function(_, k) py_remove(checkstring(k, "remove")) end,
  setHttp1ReasonPhrase = function() end,
}
local headers = setmetatable({}, {
  __index = headers_methods,
  __pairs = function(self)
    local i = 0
    return function()
      i = i + 1
      return py_item(i)
    end, self, nil
  end,
  __metatable = false,
})

local body_obj = setmetatable({}, {__index = {
  length = function() return py_body_len() end,
  getBytes = function(_, index, length) return py_body_get(index, length) end,
  setBytes = function(_, s) return py_body_set(checkstring(s, "setBytes")) end,
}, __metatable = false})

local function body(_, always_wrap)
  local state = py_body_state()
  if state == 2 then
    co_yield(BODY_WAIT)
  elseif state == 3 then
    error("body() needs the script to mention body() at load time", 2)
  end
  if not always_wrap and py_body_len() == 0 then return nil end
  return body_obj
end

local function body_chunks(self)
  local b, done = body(self, false), false
  return function()
    if done or b == nil then return nil end
    done = true
    return b
  end
end

-- trailers(): the header methods, acting on the trailers held with the body for one call each.
local function on_trailers(fn)
  return function(...)
    py_use_trailers(true)
    local ok, a, b = pcall(fn, ...)
    py_use_trailers(false)
    if not ok then error(a, 0) end
    return a, b
  end
end
local trailers_methods = {}
for name, fn in next, headers_methods do trailers_methods[name] = on_trailers(fn) end
local trailers_obj = setmetatable({}, {
  __index = trailers_methods,
  __pairs = function(self)
    local i = 0
    return on_trailers(function()
      i = i + 1
      return py_item(i)
    end), self, nil
  end,
  __metatable = false,
})

-- The route's metadata under this filter's name (or envoy.filters.http.lua), read-only.
local function route_metadata()
  local entry = py_route_metadata() or {}
  return setmetatable({}, {
    __index = {get = function(_, k) return entry[k] end},
    __pairs = function(self) return next, entry, nil end,
    __metatable = false,
  })
end

-- A method Envoy has and pyproxy does not: a script error that names it, not a bare nil call.
-- Known methods are found in the table itself (no function call per lookup).
local function strict(kind, methods)
  setmetatable(methods, {__index = function(_, name)
    error(kind .. ":" .. tostring(name) .. "() is not supported by pyproxy", 2)
  end})
  return {__index = methods, __metatable = false}
end

local function pairs_of(items)
  local i = 0
  return function()
    i = i + 1
    local item = items[i]
    if item ~= nil then return item[1], item[2] end
  end
end

-- Dynamic metadata: {namespace = {key = value}}, one per request, shared with later filters.
local dynamic_metadata = setmetatable({}, strict("dynamicMetadata", {
  set = function(_, ns, key, value)
    py_meta_set(checkstring(ns, "set"), checkstring(key, "set"), value)
  end,
  get = function(_, ns) return py_meta_get(checkstring(ns, "get")) end,
}))
dgetmt(dynamic_metadata).__pairs = function(self) return pairs_of(py_meta_items()), self, nil end

local function info_methods()
  return {
    protocol = function() return py_protocol() end,
    dynamicMetadata = function() return dynamic_metadata end,
    downstreamLocalAddress = function() return py_address(0) end,
    downstreamDirectLocalAddress = function() return py_address(0) end,
    downstreamRemoteAddress = function() return py_address(1) end,
    downstreamDirectRemoteAddress = function() return py_address(1) end,
    requestedServerName = function() return "" end,  -- no TLS termination: no SNI
    downstreamSslConnection = function() return nil end,
    routeName = function() return py_route_name() end,
    virtualClusterName = function() return "" end,
  }
end
local stream_info = setmetatable({}, strict("streamInfo", info_methods()))
local connection_stream_info = setmetatable({}, strict("connectionStreamInfo", info_methods()))
local connection = setmetatable({}, strict("connection", {ssl = function() return nil end}))

local TIMESTAMP = {MILLISECOND = 0, MICROSECOND = 1}
env.EnvoyTimestampResolution = TIMESTAMP
local function http_call(_, cluster, hdrs, call_body, timeout_or_options, asynchronous)
  if type(hdrs) ~= "table" then error("httpCall: headers table expected", 2) end
  local timeout = timeout_or_options
  if type(timeout_or_options) == "table" then
    timeout = timeout_or_options.timeout_ms or 0
    asynchronous = timeout_or_options.asynchronous
  end
  if call_body ~= nil then call_body = checkstring(call_body, "httpCall") end
  py_call_start(checkstring(cluster, "httpCall"), hdrs, call_body, tonumber(timeout) or 0,
    asynchronous and true or false)
  if asynchronous then return nil end
  local answer_headers, answer_body = co_yield(CALL_WAIT)
  return answer_headers, answer_body
end

local function make_handle(request)
  local m = {
    headers = function() return headers end,
    body = body,
    bodyChunks = body_chunks,
    trailers = function()
      if py_trailers() then return trailers_obj end
      return nil
    end,
    metadata = route_metadata,
    streamInfo = function() return stream_info end,
    connectionStreamInfo = function() return connection_stream_info end,
    connection = function() return connection end,
    route = function() return setmetatable({}, strict("route", {metadata = route_metadata})) end,
    filterContext = function() return py_filter_context() or {} end,
    clearRouteCache = function() py_clear_route() end,
    base64Escape = function(_, s) return py_b64(checkstring(s, "base64Escape")) end,
    timestamp = function() return math.floor(py_now_us() / 1000) end,
    timestampString = function(_, resolution)
      local us = py_now_us()
      if resolution == TIMESTAMP.MICROSECOND then return string.format("%d", us) end
      return string.format("%d", math.floor(us / 1000))
    end,
    importPublicKey = function(_, der, len) return py_import_key(checkstring(der, "importPublicKey"), len) end,
    verifySignature = function(_, hash, key, sig, sig_len, data, data_len)
      return py_verify(checkstring(hash, "verifySignature"), key, checkstring(sig, "verifySignature"),
        sig_len, checkstring(data, "verifySignature"), data_len)
    end,
    logTrace = function(_, msg) py_log(0, tostring(msg)) end,
    logDebug = function(_, msg) py_log(1, tostring(msg)) end,
    logInfo = function(_, msg) py_log(2, tostring(msg)) end,
    logWarn = function(_, msg) py_log(3, tostring(msg)) end,
    logErr = function(_, msg) py_log(4, tostring(msg)) end,
    logCritical = function(_, msg) py_log(5, tostring(msg)) end,
    httpCall = http_call,
  }
  if request then
    m.respond = function(_, hdrs, reply_body)
      if type(hdrs) ~= "table" then error("respond: headers table expected", 2) end
      if reply_body ~= nil then reply_body = checkstring(reply_body, "respond") end
      py_respond(hdrs, reply_body)
      error(RESPONDED, 0)
    end
  else
    m.respond = function() error("respond() is only valid in the request flow", 2) end
  end
  return setmetatable({}, strict("handle", m))
end

-- Compile into the sandbox; refuse bytecode (mode "t"): the VM trusts it to be well formed.
if code:byte(1) == 27 then return nil, "precompiled Lua bytecode is refused: give the source" end
local chunk, err = load(code, chunkname, "t", env)
if not chunk then return nil, err end
if jit then jit.off(chunk, true) end
local function run_top()
  expired, ticks = false, 0
  sethook(hook, "", PERIOD)
  local ok, e = pcall(chunk)
  sethook()
  return ok, e
end
ours[run_top] = true
local ok, top_err = run_top()
if not ok then
  return nil, (top_err == LIMIT or expired) and "instruction limit exceeded at load" or tostring(top_err)
end
local on_request, on_response = rawget(env, "envoy_on_request"), rawget(env, "envoy_on_response")
if type(on_request) ~= "function" then on_request = nil end
if type(on_response) ~= "function" then on_response = nil end

-- Direct runners: one pcall on the calling thread, the hook armed around it.
local function direct(fn, handle)
  local function run()
    expired, ticks = false, 0
    sethook(hook, "", PERIOD)
    local ok, err = pcall(fn, handle)
    sethook()
    if ok then return nil end
    return outcome(ok, err)
  end
  ours[run] = true
  return run
end

-- Coroutine runners, for scripts that may wait in body(). The hook is armed and
-- cleared around each resume (LuaJIT's hooks are global, PUC Lua's per thread),
-- so each resume has its own budget and nothing stays hooked in between.
local function step(co, ...)
  expired, ticks = false, 0
  sethook(co, hook, "", PERIOD)
  local ok, err = co_resume(co, ...)
  sethook(co)
  if ok and co_status(co) == "suspended" then
    if err == BODY_WAIT then return 3, co end
    if err == CALL_WAIT then return 4, co end
    return 2, "script yielded outside body() or httpCall()"
  end
  return outcome(ok, err)
end
ours[step] = true
local function started(fn, handle)
  return function()
    return step(co_create(function() return fn(handle) end))
  end
end

local make = py.waits and started or direct
return {
  on_request = on_request and make(on_request, make_handle(true)),
  on_response = on_response and make(on_response, make_handle(false)),
  resume = step,
}
"""


class LuaFactory(FilterFactory):
    name = "lua"
    counter_names = ("errors", "timeouts", "local_replies")

    @classmethod
    def validate(cls, config: dict) -> dict:
        inline = config.pop("inline_code", None)
        source = config.pop("source_file", None)
        if (inline is None) == (source is None):
            raise FilterConfigError("inline_code", "set exactly one of inline_code or source_file")
        if inline is not None:
            if not isinstance(inline, str) or not inline.strip():
                raise FilterConfigError("inline_code", "expected the script as a string")
            field, code, chunkname = "inline_code", inline, "=inline_code"
        else:
            if not isinstance(source, str):
                raise FilterConfigError("source_file", "expected a file path")
            try:
                with open(source, encoding="utf-8") as f:
                    code = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise FilterConfigError("source_file", f"cannot read: {exc}") from None
            field, chunkname = "source_file", "@" + source
        limits = {}
        for key, default, low in (
            ("max_instructions", DEFAULT_MAX_INSTRUCTIONS, 1000),
            ("max_memory", DEFAULT_MAX_MEMORY, 1024 * 1024),
            ("max_pattern_steps", DEFAULT_MAX_PATTERN_STEPS, 1000),
        ):
            value = config.pop(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FilterConfigError(key, f"expected an integer >= {low}")
            limits[key] = value
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        out = {
            "code": code,
            "field": field,
            "chunkname": chunkname,
            "waits": bool(_WAITS.search(code.encode())),
            **limits,
        }
        # Compile now, in a throwaway runtime, so a bad script is refused at load.
        engine = _Engine(out)
        if engine.error is not None:
            raise FilterConfigError(field, engine.error)
        if engine.on_request is None and engine.on_response is None:
            raise FilterConfigError(field, "defines neither envoy_on_request nor envoy_on_response")
        out["on_request"] = engine.on_request is not None
        out["on_response"] = engine.on_response is not None
        global _announced
        if not _announced:
            _announced = True
            log.info(
                "lua filter runtime: %s (lupa %s, module %s), max_memory %s",
                engine.version,
                engine.lupa_version,
                engine.module,
                "on" if engine.memory_capped else "unavailable",
            )
        return out

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        engine = _Engine(config, self)
        if engine.error is not None:  # validated already; a worker must not differ
            raise FilterConfigError(config["field"], engine.error)
        self.engine: _Engine | None = engine
        self.filter_class = _filter_class(config)
        self.next_log = 0.0
        self.suppressed = 0
        self.filter_name = context.filter_name
        self.clusters = context.clusters
        self.background: set = set()  # asynchronous httpCalls in flight (kept from the GC)

    def create(self) -> HttpFilter:
        return self.filter_class(self)

    def report(self, kind: str, detail: str) -> None:
        """One log line per second at most; the counters carry the exact numbers."""
        now = time.monotonic()
        if now < self.next_log:
            self.suppressed += 1
            return
        self.next_log = now + 1.0
        suppressed, self.suppressed = self.suppressed, 0
        log.error(
            "lua filter %s: %s: %s (%d similar suppressed)",
            self.filter_name,
            kind,
            detail,
            suppressed,
        )

    def close(self) -> None:
        self.engine = None


class _Engine:
    """One Lua runtime with the script compiled in it, and the Python primitives its handle calls."""

    def __init__(self, config: dict, factory: LuaFactory | None = None) -> None:
        lupa = _lupa()
        self.module = lupa.__name__
        self.lupa_version = getattr(importlib.import_module("lupa"), "__version__", "?")
        self.factory = factory
        kwargs = dict(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attributes,
        )
        try:
            runtime = lupa.LuaRuntime(max_memory=config["max_memory"], **kwargs)
            self.memory_capped = True
        except (TypeError, lupa.LuaError):
            runtime = lupa.LuaRuntime(**kwargs)
            self.memory_capped = False
        self.runtime = runtime
        self.lua_type = lupa.lua_type
        self.version = runtime.execute("return rawget(_G, 'jit') and jit.version or _VERSION")
        if isinstance(self.version, bytes):
            self.version = self.version.decode()
        # What the current hook call acts on: set by bind() before any primitive runs.
        self.map: HeaderMap
        self.filter: _LuaFilter
        # The header map aside while trailers are used.
        self.headers_map: HeaderMap | None = None
        self.trailer_map: HeaderMap | None = None
        self.added = 0
        self.items: list = []
        primitives = runtime.table_from(
            {
                b"get": self.get,
                b"get_at": self.get_at,
                b"count": self.count,
                b"add": self.add,
                b"set": self.set,
                b"remove": self.remove,
                b"item": self.item,
                b"respond": self.respond,
                b"log": self.log,
                b"protocol": self.protocol,
                b"body_state": self.body_state,
                b"body_len": self.body_len,
                b"body_get": self.body_get,
                b"body_set": self.body_set,
                b"trailers": self.trailers,
                b"use_trailers": self.use_trailers,
                b"route_metadata": self.route_metadata,
                b"route_name": self.route_name,
                b"filter_context": self.filter_context,
                b"clear_route": self.clear_route,
                b"meta_set": self.meta_set,
                b"meta_get": self.meta_get,
                b"meta_items": self.meta_items,
                b"address": self.address,
                b"call_start": self.call_start,
                b"b64": lambda data: base64.b64encode(data),
                b"now_us": lambda: time.time_ns() // 1000,
                b"import_key": self.import_key,
                b"verify": self.verify,
                b"waits": config["waits"],
                b"max_seconds": MAX_CPU_SECONDS,
                b"pattern_steps": config["max_pattern_steps"],
                b"pattern_shape": pattern_shape,
                b"count_byte": bytes.count,
            }
        )
        self.error = None
        # The script's Lua functions (lupa has no type stubs); None when it failed to load.
        self.on_request: Any = None
        self.on_response: Any = None
        self.resume: Any = None
        try:
            result = runtime.execute(
                _PRELUDE,
                primitives,
                config["code"].encode(),
                config["chunkname"].encode(),
                config["max_instructions"],
            )
        except lupa.LuaError as exc:
            self.error = str(exc)
            return
        if isinstance(result, tuple):
            self.error = result[1].decode(errors="replace") if result[1] else "load failed"
            return
        self.on_request = result[b"on_request"]
        self.on_response = result[b"on_response"]
        self.resume = result[b"resume"]

    # ---- header primitives (act on self.map) --------------------------------------

    def get(self, name: bytes):
        values = self.map.get_all(name)
        if not values:
            return None
        return values[0] if len(values) == 1 else b",".join(values)

    def get_at(self, name: bytes, index):
        values = self.map.get_all(name)
        if isinstance(index, int) and 0 <= index < len(values):
            return values[index]
        return None

    def count(self, name: bytes) -> int:
        return len(self.map.get_all(name))

    def bind(self, headers, lua_filter) -> None:
        """Act on this request's headers and filter until the next bind."""
        self.map = headers
        self.filter = lua_filter
        self.added = 0

    def _charge(self, name: bytes, value: bytes) -> HeaderMap:
        """Count what a script adds; the map it acts on."""
        added = self.added = self.added + len(name) + len(value)
        if added > MAX_ADDED_HEADER_BYTES:
            raise ValueError(f"a script may add at most {MAX_ADDED_HEADER_BYTES} header bytes")
        return self.map

    def add(self, name: bytes, value: bytes) -> None:
        self._charge(name, value).add(name, value)

    def set(self, name: bytes, value: bytes) -> None:
        self._charge(name, value).set(name, value)

    def remove(self, name: bytes) -> None:
        self.map.remove(name)

    def item(self, i: int):
        if i == 1:  # a snapshot per iteration: edits during pairs() do not derail it
            self.items = self.map.items()
        if i <= len(self.items):
            return self.items[i - 1]
        return None

    # ---- handle primitives (act on self.filter) -----------------------------------

    def respond(self, table, body) -> None:
        status = None
        headers = []
        for key, value in table.items():
            key = key if isinstance(key, bytes) else str(key).encode()
            values = value.values() if self.lua_type(value) == "table" else (value,)
            for v in values:
                v = v if isinstance(v, bytes) else str(v).encode()
                if key == b":status":
                    status = v
                elif key.lower() != b"content-length":
                    headers.append((key.lower(), v))
        try:
            code = int(status or b"")
        except ValueError:
            raise ValueError("respond: headers need a numeric ':status'") from None
        if not 200 <= code <= 599:
            raise ValueError("respond: ':status' must be 200-599")
        self.filter.reply = (code, body or b"", headers)

    def log(self, level: int, message: bytes) -> None:
        py_level = _LEVELS.get(level, logging.INFO)
        if log.isEnabledFor(py_level):
            name = self.factory.filter_name if self.factory is not None else "lua"
            log.log(py_level, "lua filter %s: %s", name, message.decode(errors="replace"))

    def protocol(self) -> bytes:
        return self.filter.callbacks.exchange.downstream.protocol.encode()

    def body_state(self) -> int:
        """0: no body or it is here; 2: the script must wait; 3: it cannot wait (no data hooks)."""
        f = self.filter
        if f.body is not None or f.no_body:
            return 0
        return 2 if f.can_wait else 3

    def body_len(self) -> int:
        body = self.filter.body
        return len(body) if body is not None else 0

    def body_get(self, index, length) -> bytes:
        body = self.filter.body or b""
        if not isinstance(index, int) or not isinstance(length, int):
            raise ValueError("getBytes: integer index and length expected")
        if index < 0 or length < 0 or index + length > len(body):
            raise ValueError("getBytes: index + length out of range")
        return body[index : index + length]

    def body_set(self, data: bytes) -> int:
        f = self.filter
        f.body = data
        f.body_changed = True
        if self.map.get(b"content-length") is not None:
            self.map.set(b"content-length", b"%d" % len(data))
        return len(data)

    # ---- trailers, dynamic metadata, addresses, callouts, signatures (act on self.filter) ---

    def trailers(self) -> bool:
        """Whether trailers arrived with the body the script waited for (Envoy: after body())."""
        f = self.filter
        held = f.callbacks.held_trailers("decode" if f.decoding else "encode")
        self.trailer_map = None if held is None else HeaderMap(held, {})
        return held is not None

    def _route_entry(self, field: str):
        """This filter's entry (under its name, or envoy.filters.http.lua) in a per-filter map
        of the request's route (metadata, filter_context), as a Lua table; None if none."""
        by_filter = getattr(self.filter.callbacks.current_route(), field, None)
        if not by_filter:
            return None
        name = self.factory.filter_name if self.factory is not None else ""
        entry = by_filter.get(name, by_filter.get("envoy.filters.http.lua"))
        return None if entry is None else self._to_lua(_as_bytes(entry))

    def route_metadata(self):
        return self._route_entry("metadata")

    def filter_context(self):
        """Envoy's LuaPerRoute filter_context: the route's filter_context for this filter."""
        return self._route_entry("filter_context")

    def route_name(self) -> bytes:
        return getattr(self.filter.callbacks.current_route(), "name", "").encode()

    def clear_route(self) -> None:
        self.filter.callbacks.clear_route_cache()

    def use_trailers(self, on: bool) -> None:
        if on:
            if self.trailer_map is None:
                raise ValueError("trailers: none arrived with this body")
            self.headers_map, self.map = self.map, self.trailer_map
        elif self.headers_map is not None:
            self.map = self.headers_map

    def _from_lua(self, value, depth: int = 0):
        if self.lua_type(value) != "table":
            return value
        if depth > 8:
            raise ValueError("dynamicMetadata: value nested deeper than 8 tables")
        return {k: self._from_lua(v, depth + 1) for k, v in value.items()}

    def _to_lua(self, value):
        if isinstance(value, dict):
            return self.runtime.table_from({k: self._to_lua(v) for k, v in value.items()})
        return value

    def _metadata(self, create: bool = False) -> dict | None:
        chain = self.filter.callbacks
        metadata = chain.dynamic_metadata
        if metadata is None and create:
            metadata = chain.dynamic_metadata = {}
        return metadata

    def meta_set(self, namespace: bytes, key: bytes, value) -> None:
        metadata = self._metadata(create=True)
        assert metadata is not None, "created when missing"
        metadata.setdefault(namespace, {})[key] = self._from_lua(value)

    def meta_get(self, namespace: bytes):
        entry = (self._metadata() or {}).get(namespace)
        return None if entry is None else self._to_lua(entry)

    def meta_items(self):
        items = (self._metadata() or {}).items()
        table_from = self.runtime.table_from
        return table_from([table_from([ns, self._to_lua(entry)]) for ns, entry in items])

    def address(self, remote: int) -> bytes | None:
        """The downstream connection's local (0) or remote (1) address, as Envoy prints it."""
        name = downstream_address(self.filter.callbacks, bool(remote))
        if name is None:
            return None
        if isinstance(name, str):  # a Unix socket
            return name.encode() or b"@"
        host, port = name
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()

    def call_start(self, cluster: bytes, headers, body, timeout_ms, asynchronous: bool) -> None:
        """handle:httpCall(): checked here; a synchronous call starts when the script has yielded."""
        factory = self.factory
        config = factory.clusters.get(cluster.decode(errors="replace")) if factory else None
        if factory is None or config is None:
            raise ValueError(f"httpCall: no cluster named {cluster.decode(errors='replace')!r}")
        pairs = []
        for key, value in headers.items():
            key = key if isinstance(key, bytes) else str(key).encode()
            values = value.values() if self.lua_type(value) == "table" else (value,)
            for v in values:
                pairs.append((key.lower(), v if isinstance(v, bytes) else str(v).encode()))
        names = {k for k, _ in pairs}
        if not {b":method", b":path", b":authority"} <= names:
            raise ValueError("httpCall: headers need :method, :path and :authority")
        timeout = min(timeout_ms / 1000, MAX_CALL_TIMEOUT) if timeout_ms > 0 else MAX_CALL_TIMEOUT
        call = http_call(config, pairs, body or b"", timeout)
        if asynchronous:  # fire and forget, as in Envoy: the script goes on at once
            task = self.filter.callbacks.loop.create_task(call)
            factory.background.add(task)
            task.add_done_callback(_forget(factory.background))
        else:
            self.filter.pending_call = call

    def call_answer(self, result: CallResult | None):
        """(headers table, body or nil) for the script; a failed call reads as a 503 like Envoy's."""
        if result is None:
            return self.runtime.table_from({b":status": b"503"}), None
        headers: dict[bytes, bytes] = {}
        for key, value in result.headers:
            headers[key] = value  # a repeated header: the last value, Envoy's default
        return self.runtime.table_from(headers), result.body or None

    def import_key(self, der: bytes, _length=None):
        serialization = _crypto("serialization")
        try:
            return serialization.load_der_public_key(der)
        except ValueError:
            return None

    def verify(self, hash_name: bytes, key, signature: bytes, _slen, data: bytes, _dlen):
        hashes, padding, ec = _crypto("hashes"), _crypto("padding"), _crypto("ec")
        algorithm = getattr(hashes, hash_name.decode(errors="replace").upper(), None)
        if algorithm is None or hash_name.upper() not in (
            b"SHA1",
            b"SHA224",
            b"SHA256",
            b"SHA384",
            b"SHA512",
        ):
            return False, b"unknown is not supported."
        if key is None:
            return False, b"Failed to verify digest. Error code: 0"
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(algorithm()))
            else:
                key.verify(signature, data, padding.PKCS1v15(), algorithm())
        except Exception:
            return False, b"Failed to verify digest. Error code: 0"
        return True, None


def _as_bytes(value):
    """Config (YAML) text as the byte strings Lua scripts see."""
    if isinstance(value, dict):
        return {_as_bytes(k): _as_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return {i + 1: _as_bytes(v) for i, v in enumerate(value)}
    return value.encode() if isinstance(value, str) else value


def _forget(tasks: set):
    def done(task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("lua filter: asynchronous httpCall failed: %s", task.exception())

    return done


def _crypto(name: str):
    """importPublicKey/verifySignature need the `cryptography` package."""
    qualified = {
        "serialization": "cryptography.hazmat.primitives.serialization",
        "hashes": "cryptography.hazmat.primitives.hashes",
        "padding": "cryptography.hazmat.primitives.asymmetric.padding",
    }.get(name, "cryptography.hazmat.primitives.asymmetric.ec")
    try:
        return importlib.import_module(qualified)
    except ImportError:
        raise ValueError("importPublicKey/verifySignature need the cryptography package") from None


class _LuaFilter(HttpFilter):
    """Per request; which hooks exist depends on the script (see _filter_class)."""

    __slots__ = (
        "factory",
        "engine",
        "callbacks",
        "reply",
        "co",
        "body",
        "body_changed",
        "no_body",
        "can_wait",
        "pending_call",
        "call_task",
        "decoding",
    )

    def __init__(self, factory: LuaFactory) -> None:
        self.factory = factory
        assert factory.engine is not None, "a closed factory makes no filters"
        self.engine: _Engine = factory.engine
        self.reply: tuple[int, bytes, list] | None = None  # a local reply the script asked for
        self.co: object | None = None  # the script's coroutine while it waits
        self.body: bytes | None = None
        self.can_wait = factory.config["waits"]
        # The coroutine of a synchronous httpCall, started on its yield.
        self.pending_call: Coroutine[Any, Any, CallResult] | None = None
        self.call_task: asyncio.Task | None = None
        self.decoding = True

    def _run(self, runner, headers, end_stream: bool) -> int:
        engine = self.engine
        # engine.bind(headers, self), inline: once per request.
        engine.map = headers
        engine.filter = self
        engine.added = 0
        self.no_body = end_stream
        self.body_changed = False
        # Per call: a shared instance (see _filter_class) serves every request.
        self.reply = None
        self.body = None
        try:
            result = runner()
        except Exception as exc:  # e.g. out of memory outside the script's own pcall
            result = (_ERROR, str(exc).encode())
        if result is None:
            if self.reply is None:
                return CONTINUE
            return self._respond()
        return self._outcome(result)

    def _outcome(self, result) -> int:
        code = result if isinstance(result, int) else result[0]
        if code == _WAITING:
            self.co = result[1]
            return STOP_AND_BUFFER
        if code == _CALLING:
            self.co = result[1]
            call, self.pending_call = self.pending_call, None
            self.call_task = task = self.callbacks.loop.create_task(call)
            task.add_done_callback(self._call_done)
            return STOP_AND_BUFFER  # a body arriving meanwhile is held
        factory = self.factory
        if code == _TIMEOUT:
            factory.counters[TIMEOUTS] += 1
            factory.report("instruction limit exceeded", factory.config["field"])
        else:
            factory.counters[ERRORS] += 1
            detail = result[1] if isinstance(result, tuple) else b"?"
            factory.report("script error", detail.decode(errors="replace"))
        self.callbacks.send_local_reply(500, b"lua script error\n", flag="LR")
        return STOP

    def _respond(self) -> int:
        assert self.reply is not None, "called once the script asked for a reply"
        status, body, headers = self.reply
        self.factory.counters[REPLIES] += 1
        self.callbacks.send_local_reply(status, body, headers, flag="LR")
        return STOP

    def _call_done(self, task: asyncio.Task) -> None:
        """The synchronous httpCall answered (or failed): resume the script where it waits."""
        self.call_task = None
        co, self.co = self.co, None
        if co is None or task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (CalloutError, ValueError)):
            log.warning("lua filter: httpCall failed: %r", exc)
        engine = self.engine
        cb = self.callbacks
        engine.bind(cb.request_headers() if self.decoding else cb.response_headers(), self)
        self.reply = None
        try:
            answer = engine.call_answer(None if exc is not None else task.result())
            result = engine.resume(co, *answer)
        except Exception as error:
            result = (_ERROR, str(error).encode())
        if result is None:
            if self.reply is not None:
                self._respond()
            elif self.decoding:
                cb.continue_decoding()
            else:
                cb.continue_encoding()
            return
        if isinstance(result, tuple) and result[0] == _WAITING:
            result = (_ERROR, b"body() after httpCall() in one handler is not supported by pyproxy")
        self._outcome(result)

    def _body_done(self, headers, buffer, set_buffer) -> int:
        co = self.co
        if co is None:
            return CONTINUE  # the replay of a body this filter already handled, or no wait
        self.co = None
        engine = self.engine
        engine.bind(headers, self)
        self.body = buffer()
        try:
            result = engine.resume(co)
        except Exception as exc:
            result = (_ERROR, str(exc).encode())
        if self.body_changed:
            set_buffer(self.body)
        if result is None:
            if self.reply is None:
                return CONTINUE
            return self._respond()
        return self._outcome(result)


class _Waits(_LuaFilter):
    """Scripts that may wait (body, httpCall): a suspended coroutine or call is dropped with its request."""

    __slots__ = ()

    def on_destroy(self) -> None:
        self.co = None
        self.pending_call = None
        if self.call_task is not None:
            self.call_task.cancel()
            self.call_task = None


class _Request(_LuaFilter):
    __slots__ = ()

    def decode_headers(self, headers, end_stream: bool) -> int:
        self.decoding = True
        return self._run(self.engine.on_request, headers, end_stream)


class _RequestBody(_LuaFilter):
    __slots__ = ()

    def decode_data(self, data, end_stream: bool) -> int:
        if self.call_task is not None:
            return STOP_AND_BUFFER
        if self.co is None:
            return CONTINUE
        cb = self.callbacks
        return self._body_done(cb.request_headers(), cb.decoding_buffer, cb.set_decoding_buffer)


class _Response(_LuaFilter):
    __slots__ = ()

    def encode_headers(self, headers, end_stream: bool) -> int:
        self.decoding = False
        return self._run(self.engine.on_response, headers, end_stream)


class _ResponseBody(_LuaFilter):
    __slots__ = ()

    def encode_data(self, data, end_stream: bool) -> int:
        if self.call_task is not None:
            return STOP_AND_BUFFER
        if self.co is None:
            return CONTINUE
        cb = self.callbacks
        return self._body_done(cb.response_headers(), cb.encoding_buffer, cb.set_encoding_buffer)


_CLASSES: dict[tuple[bool, bool, bool], type] = {}


def _filter_class(config: dict) -> type:
    """A class with only the hooks this script needs: no response function, no encode hooks.

    A script that never waits for a body keeps nothing between hook calls (each call's state
    is reset when it starts), so one instance per worker serves every request.
    """
    key = (config["on_request"], config["on_response"], config["waits"])
    cls = _CLASSES.get(key)
    if cls is None:
        bases: list[type] = [_Waits] if config["waits"] else []
        if config["on_request"]:
            bases.append(_Request)
            if config["waits"]:
                bases.append(_RequestBody)
        if config["on_response"]:
            bases.append(_Response)
            if config["waits"]:
                bases.append(_ResponseBody)
        namespace = {"__slots__": (), "shared": not config["waits"]}
        cls = type("LuaFilter", (*bases, _LuaFilter), namespace)
        _CLASSES[key] = cls
    return cls


LuaFactory.filter_class = _LuaFilter
