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
  which resumes it. Scripts that never mention `body` call straight through and
  have no data hooks at all.
- A script error or the instruction limit answers 500 and logs one line (at
  most one per second per filter, with a count of what was suppressed).
- What the hook cannot stop is priced instead: Lua's pattern matcher backtracks
  in C, so string.find/match/gmatch/gsub are wrapped and a call whose worst
  case (see pattern_shape) exceeds max_pattern_steps is a script error; header
  bytes handed to Python are capped per call (MAX_ADDED_HEADER_BYTES), outside
  the Lua memory cap.
"""

from __future__ import annotations

import importlib
import logging
import re
import time

from pyproxy.chain.api import (
    CONTINUE,
    STOP,
    STOP_AND_BUFFER,
    FilterConfigError,
    FilterFactory,
    HttpFilter,
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
_TIMEOUT, _ERROR, _WAITING = 1, 2, 3
_LEVELS = {
    0: logging.DEBUG,  # logTrace: Python has no TRACE level
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
    5: logging.CRITICAL,
}
# `handle:body()`, `h.body(h)`, `h["body"]`: only such scripts pay for a coroutine and data hooks.
_USES_BODY = re.compile(rb"[:.]\s*body(?:Chunks)?\s*\(|\[\s*[\"']body(?:Chunks)?[\"']\s*\]")
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
local headers_methods = {
  get = function(_, k) return py_get(checkstring(k, "get")) end,
  getAtIndex = function(_, k, i) return py_get_at(checkstring(k, "getAtIndex"), i) end,
  getNumValues = function(_, k) return py_count(checkstring(k, "getNumValues")) end,
  add = function(_, k, v) py_add(checkstring(k, "add"), checkstring(v, "add")) end,
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

local empty_mt = {__index = {get = function() return nil end}, __pairs = function(self)
  return function() return nil end, self, nil
end, __metatable = false}
local metadata = setmetatable({}, empty_mt)
local stream_info = setmetatable({}, {__index = {
  protocol = function() return py_protocol() end,
  dynamicMetadata = function() return metadata end,
}, __metatable = false})
local connection = setmetatable({}, {__index = {ssl = function() return nil end}, __metatable = false})

local function make_handle(request)
  local m = {
    headers = function() return headers end,
    body = body,
    bodyChunks = body_chunks,
    trailers = function() return nil end,
    metadata = function() return metadata end,
    streamInfo = function() return stream_info end,
    connection = function() return connection end,
    logTrace = function(_, msg) py_log(0, tostring(msg)) end,
    logDebug = function(_, msg) py_log(1, tostring(msg)) end,
    logInfo = function(_, msg) py_log(2, tostring(msg)) end,
    logWarn = function(_, msg) py_log(3, tostring(msg)) end,
    logErr = function(_, msg) py_log(4, tostring(msg)) end,
    logCritical = function(_, msg) py_log(5, tostring(msg)) end,
    httpCall = function() error("httpCall() is not supported by pyproxy", 2) end,
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
  return setmetatable({}, {__index = m, __metatable = false})
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
    return outcome(ok, err)
  end
  ours[run] = true
  return run
end

-- Coroutine runners, for scripts that may wait in body(). The hook is armed and
-- cleared around each resume (LuaJIT's hooks are global, PUC Lua's per thread),
-- so each resume has its own budget and nothing stays hooked in between.
local function step(co)
  expired, ticks = false, 0
  sethook(co, hook, "", PERIOD)
  local ok, err = co_resume(co)
  sethook(co)
  if ok and co_status(co) == "suspended" then
    if err == BODY_WAIT then return 3, co end
    return 2, "script yielded outside body()"
  end
  return outcome(ok, err)
end
ours[step] = true
local function started(fn, handle)
  return function()
    return step(co_create(function() return fn(handle) end))
  end
end

local make = py.uses_body and started or direct
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
            "uses_body": bool(_USES_BODY.search(code.encode())),
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
        self.engine = _Engine(config, self)
        if self.engine.error is not None:  # validated already; a worker must not differ
            raise FilterConfigError(config["field"], self.engine.error)
        self.filter_class = _filter_class(config)
        self.next_log = 0.0
        self.suppressed = 0
        self.filter_name = context.filter_name

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
        # What the current hook call acts on.
        self.map = None
        self.filter = None
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
                b"uses_body": config["uses_body"],
                b"max_seconds": MAX_CPU_SECONDS,
                b"pattern_steps": config["max_pattern_steps"],
                b"pattern_shape": pattern_shape,
                b"count_byte": bytes.count,
            }
        )
        self.error = None
        self.on_request = self.on_response = self.resume = None
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

    def _charge(self, name: bytes, value: bytes) -> None:
        self.added += len(name) + len(value)
        if self.added > MAX_ADDED_HEADER_BYTES:
            raise ValueError(f"a script may add at most {MAX_ADDED_HEADER_BYTES} header bytes")

    def add(self, name: bytes, value: bytes) -> None:
        self._charge(name, value)
        self.map.add(name, value)

    def set(self, name: bytes, value: bytes) -> None:
        self._charge(name, value)
        self.map.set(name, value)

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
            code = int(status)
        except (TypeError, ValueError):
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
    )

    def __init__(self, factory: LuaFactory) -> None:
        self.factory = factory
        self.engine = factory.engine
        self.reply = None
        self.co = None
        self.body = None
        self.can_wait = factory.config["uses_body"]

    def _run(self, runner, headers, end_stream: bool) -> int:
        engine = self.engine
        engine.bind(headers, self)
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
        status, body, headers = self.reply
        self.factory.counters[REPLIES] += 1
        self.callbacks.send_local_reply(status, body, headers, flag="LR")
        return STOP

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


class _Waits:
    """Scripts that may wait for a body: a suspended coroutine is dropped with its request."""

    __slots__ = ()

    def on_destroy(self) -> None:
        self.co = None


class _Request:
    __slots__ = ()

    def decode_headers(self, headers, end_stream: bool) -> int:
        return self._run(self.engine.on_request, headers, end_stream)


class _RequestBody:
    __slots__ = ()

    def decode_data(self, data, end_stream: bool) -> int:
        if self.co is None:
            return CONTINUE
        cb = self.callbacks
        return self._body_done(cb.request_headers(), cb.decoding_buffer, cb.set_decoding_buffer)


class _Response:
    __slots__ = ()

    def encode_headers(self, headers, end_stream: bool) -> int:
        return self._run(self.engine.on_response, headers, end_stream)


class _ResponseBody:
    __slots__ = ()

    def encode_data(self, data, end_stream: bool) -> int:
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
    key = (config["on_request"], config["on_response"], config["uses_body"])
    cls = _CLASSES.get(key)
    if cls is None:
        bases: list[type] = [_Waits] if config["uses_body"] else []
        if config["on_request"]:
            bases.append(_Request)
            if config["uses_body"]:
                bases.append(_RequestBody)
        if config["on_response"]:
            bases.append(_Response)
            if config["uses_body"]:
                bases.append(_ResponseBody)
        namespace = {"__slots__": (), "shared": not config["uses_body"]}
        cls = type("LuaFilter", (*bases, _LuaFilter), namespace)
        _CLASSES[key] = cls
    return cls


LuaFactory.filter_class = _LuaFilter
