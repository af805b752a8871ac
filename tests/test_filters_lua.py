"""The Lua filter through a real pyproxy process: Envoy's handle API, body buffering, sandbox, limits, bad scripts."""

from __future__ import annotations

import hashlib
import json
import socket
import textwrap
import time

import pytest
from conftest import (
    ProxyProcess,
    config_refused,
    curl,
    filter_yaml,
    free_port,
    listener_yaml,
    split_response,
)
from http_peer import HttpUpstream

HEADERS_SCRIPT = """
function envoy_on_request(handle)
  local h = handle:headers()
  local path = h:get(":path")
  h:add("x-lua-added", "yes")
  h:replace("x-replace-me", "replaced")
  h:remove("x-remove-me")
  h:add("x-lua-protocol", handle:streamInfo():protocol())
  h:add("x-lua-sandbox", table.concat({tostring(os.execute), tostring(io), tostring(require),
    tostring(debug), tostring(load), tostring(loadstring), tostring(dofile), tostring(package),
    tostring(collectgarbage), tostring(string.dump)}, ","))
  local n = 0
  for name, value in pairs(h) do
    if name == "x-count-me" then n = n + 1 end
  end
  h:add("x-lua-counted", n)
  h:add("x-lua-multi", h:get("x-multi") or "none")
  handle:logInfo("lua saw " .. path)
  if path == "/reply" then
    handle:respond({[":status"] = "418", ["x-lua-reply"] = "teapot",
                    ["content-type"] = "text/plain"}, "short and stout")
  elseif path == "/error" then
    error("deliberate failure")
  elseif path == "/spin" then
    while true do end
  elseif path == "/spin-pcall" then
    while true do pcall(function() while true do end end) end
  elseif path == "/heavy" then
    local s
    for i = 1, 1e6 do s = string.rep("x", 1e6) end
  elseif path == "/badheader" then
    h:add("x-smuggled", "a\\r\\nb: c")
  elseif path == "/memory" then
    local s = string.rep("x", 64 * 1024 * 1024)
  end
end

function envoy_on_response(handle)
  handle:headers():replace("x-lua-response", "set")
  handle:headers():add("x-lua-status", handle:headers():get(":status"))
end
"""

BODY_SCRIPT = """
function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then
    handle:headers():add("x-lua-body", "none")
    return
  end
  if handle:headers():get(":path") == "/spin" then
    while true do end
  end
  handle:headers():add("x-lua-body-length", body:length())
  handle:headers():add("x-lua-first", body:getBytes(0, 3))
  body:setBytes(string.upper(body:getBytes(0, body:length())) .. "!")
end

function envoy_on_response(handle)
  local body = handle:body()
  handle:headers():add("x-lua-response-body-length", body and body:length() or 0)
end
"""


def _write_config(tmp_path, listeners: list[tuple[str, int, str, str]]) -> str:
    parts = ["listeners:"]
    for name, port, upstream, script in listeners:
        parts.append(
            f"""
  - name: {name}
    mode: http
    address: 127.0.0.1:{port}
    upstream: {upstream}
    filters:
      - name: script
        type: lua
        config:
          inline_code: |
{textwrap.indent(script.strip(), " " * 12)}
"""
        )
    path = tmp_path / "proxy.yaml"
    path.write_text("".join(parts))
    return str(path)


@pytest.fixture(scope="module")
def lua_proxy(tmp_path_factory):
    """One proxy, two listeners (headers script, body script), one upstream, for the whole module."""
    upstream = HttpUpstream()
    tmp = tmp_path_factory.mktemp("lua")
    main, body = free_port(), free_port()
    path = _write_config(
        tmp,
        [
            ("main", main, upstream.address, HEADERS_SCRIPT),
            ("body", body, upstream.address, BODY_SCRIPT),
        ],
    )
    proxy = ProxyProcess(["-c", path]).wait_ready()
    yield proxy, main, body
    proxy.stop()
    upstream.close()


def _get(port: int, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    result = curl("-D", "-", *extra, f"http://127.0.0.1:{port}{path}")
    assert result.returncode == 0, result.stderr
    return split_response(result.stdout)


def _echoed(body: bytes) -> dict:
    info = json.loads(body)
    info["h"] = {}
    for name, value in info["headers"]:
        info["h"].setdefault(name, []).append(value)
    return info


def test_request_headers_added_replaced_removed_seen_upstream(lua_proxy):
    proxy, port, _ = lua_proxy
    status, headers, body = _get(
        port,
        "/echo",
        "-H",
        "x-replace-me: original",
        "-H",
        "x-remove-me: gone",
        "-H",
        "x-count-me: 1",
        "-H",
        "x-multi: a",
        "-H",
        "x-multi: b",
    )
    assert status == 200
    seen = _echoed(body)["h"]
    assert seen["x-lua-added"] == ["yes"]
    assert seen["x-replace-me"] == ["replaced"]
    assert "x-remove-me" not in seen
    assert seen["x-lua-counted"] == ["1"]  # pairs() iterates the headers
    assert seen["x-lua-multi"] == ["a,b"]  # Envoy joins repeated values with ","
    assert seen["x-lua-protocol"] == ["HTTP/1.1"]
    # Response side: set by envoy_on_response, which also saw the upstream's status.
    assert headers["x-lua-response"] == "set"
    assert headers["x-lua-status"] == "200"


def test_sandbox_has_no_os_io_require_debug_load(lua_proxy):
    _, port, _ = lua_proxy
    _, _, body = _get(port, "/echo")
    sandbox = _echoed(body)["h"]["x-lua-sandbox"][0].split(",")
    assert sandbox == ["nil"] * 10, sandbox


def test_respond_answers_locally_with_status_headers_body(lua_proxy):
    _, port, _ = lua_proxy
    result = curl("-D", "-", f"http://127.0.0.1:{port}/reply")
    status, headers, body = split_response(result.stdout)
    assert result.stdout.lower().count(b"content-type:") == 1  # the script's replaces the default
    assert status == 418
    assert headers["x-lua-reply"] == "teapot"
    assert headers["content-type"] == "text/plain"
    assert body == b"short and stout"


def test_log_info_reaches_the_proxy_log(lua_proxy):
    proxy, port, _ = lua_proxy
    _get(port, "/echo?log-marker")
    deadline = time.monotonic() + 3
    while "lua saw /echo?log-marker" not in proxy.output and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "lua saw /echo?log-marker" in proxy.output


def test_script_error_is_500_and_one_log_line(lua_proxy):
    proxy, port, _ = lua_proxy
    before = proxy.output.count("deliberate failure")
    for _ in range(3):
        status, _, _ = _get(port, "/error")
        assert status == 500
    time.sleep(0.2)
    # Rate-limited: three errors within a second log once.
    assert proxy.output.count("deliberate failure") - before == 1, proxy.output
    assert proxy.listener("main")["filters"]["script"]["errors"] >= 3


@pytest.mark.parametrize("path", ["/spin", "/spin-pcall", "/heavy", "/memory", "/badheader"])
def test_runaway_script_is_stopped_and_the_proxy_keeps_serving(lua_proxy, path):
    proxy, port, _ = lua_proxy
    t0 = time.monotonic()
    status, _, _ = _get(port, path)
    elapsed = time.monotonic() - t0
    assert status == 500
    assert elapsed < 1.0, elapsed
    status, _, _ = _get(port, "/echo")
    assert status == 200
    if path in ("/spin", "/spin-pcall", "/heavy"):
        assert proxy.listener("main")["filters"]["script"]["timeouts"] >= 1


def test_body_is_buffered_read_and_replaced(lua_proxy):
    _, _, port = lua_proxy
    payload = b"hello lua body " * 500  # several reads' worth
    status, headers, body = _get(
        port, "/echo", "-X", "POST", "-H", "Expect:", "--data-binary", payload.decode()
    )
    assert status == 200
    info = _echoed(body)
    replaced = payload.upper() + b"!"
    assert info["h"]["x-lua-body-length"] == [str(len(payload))]
    assert info["h"]["x-lua-first"] == ["hel"]
    assert info["body_length"] == len(replaced)
    assert info["body_sha256"] == hashlib.sha256(replaced).hexdigest()
    assert info["h"]["content-length"] == [str(len(replaced))]
    # envoy_on_response waited for the whole response body too.
    assert headers["x-lua-response-body-length"] == str(len(body))


def test_runaway_script_waiting_on_the_body_is_stopped(lua_proxy):
    proxy, _, port = lua_proxy
    t0 = time.monotonic()
    status, _, _ = _get(port, "/spin", "-X", "POST", "-H", "Expect:", "--data-binary", "x" * 3000)
    assert status == 500
    assert time.monotonic() - t0 < 1.0
    assert proxy.listener("body")["filters"]["script"]["timeouts"] >= 1
    status, _, _ = _get(port, "/echo", "-X", "POST", "-H", "Expect:", "--data-binary", "okay")
    assert status == 200


def test_body_of_a_request_without_one_is_nil(lua_proxy):
    _, _, port = lua_proxy
    status, _, body = _get(port, "/echo")
    assert status == 200
    assert _echoed(body)["h"]["x-lua-body"] == ["none"]


def test_body_with_chunked_request_over_a_raw_socket(lua_proxy):
    _, _, port = lua_proxy
    chunks = b"5\r\nabcde\r\n3\r\nfgh\r\n0\r\n\r\n"
    request = (
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        time.sleep(0.05)  # the body arrives after the headers were held
        sock.sendall(chunks)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    status, _, body = split_response(out)
    assert status == 200
    info = json.loads(body)
    assert info["body_length"] == len(b"ABCDEFGH!")
    assert info["body_sha256"] == hashlib.sha256(b"ABCDEFGH!").hexdigest()


def test_filter_stage_is_timed(lua_proxy):
    proxy, port, _ = lua_proxy
    _get(port, "/echo")
    stage = proxy.listener("main")["stages"]["filter:script"]
    assert stage["events"] >= 2 and stage["ns"] > 0


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ("inline_code: 'function envoy_on_request(h) h:headers( end'", "unexpected symbol"),
        ("inline_code: 'local x = 1'", "neither envoy_on_request nor envoy_on_response"),
        ("inline_code: 'while true do end'", "instruction limit"),
        ("source_file: /nonexistent/script.lua", "cannot read"),
    ],
)
def test_bad_script_is_refused_at_load_naming_the_field(tmp_path, config, expect):
    field = config.split(":", 1)[0]
    filters = filter_yaml("script", f"{{{config}}}", type="lua")
    out = config_refused(tmp_path, listener_yaml(free_port(), "127.0.0.1:9", filters))
    output = out.stderr + out.stdout
    assert f"filters[0].config.{field}" in output, output
    assert expect in output, output


# Each path tries one way out of the sandbox or one way to stall the worker; the marker file
# shows whether os.execute got anywhere.
ESCAPE_SCRIPT = """
function envoy_on_request(handle)
  local h = handle:headers()
  local path = h:get(":path")
  if path == "/io-open" then
    h:add("x-leak", io.open("/etc/passwd"):read("*a"))
  elseif path == "/os-execute" then
    os.execute("touch MARKER")
  elseif path == "/require-socket" then
    local socket = require("socket")
    socket.connect("127.0.0.1", 9)
  elseif path == "/require-ffi" then
    require("ffi").C.system("touch MARKER")
  elseif path == "/load-bytecode" then
    local loader = load or loadstring
    loader(string.dump(function() return 1 end))()
  elseif path == "/string-metatable" then
    getmetatable("").__index.dump = function() end
  elseif path == "/debug-registry" then
    debug.getregistry()
  elseif path == "/rep-bomb" then
    local s = string.rep("x", 2 ^ 30)
  elseif path == "/concat-bomb" then
    local t = {}
    for i = 1, 1e8 do t[i] = "0123456789abcdef" end
    h:add("x-big", table.concat(t))
  elseif path == "/pattern-bomb" then
    string.find(string.rep("a", 3000), ".-.-.-.-b")
  elseif path == "/gmatch-bomb" then
    for m in (string.rep("a", 200000)):gmatch(".-b") do end
  elseif path == "/pattern-loop" then
    local s = string.rep("a", 3000)
    while true do pcall(string.find, s, ".-b") end
  elseif path == "/header-bomb" then
    for i = 1, 100 do h:add("x-bomb-" .. i, string.rep("y", 1000)) end  -- 100 KB, past the cap
  elseif path == "/spin" then
    while true do end
  elseif path == "/echo?patterns" then
    local _, _, version, name = string.find("/api/v1/users", "^/api/(v%d+)/(%w+)")
    h:add("x-route", version .. "," .. name)
    h:add("x-trim", ("  padded  "):match("^%s*(.-)%s*$"))
    h:add("x-swap", (("k=v"):gsub("(%w)=(%w)", "%2=%1")))
    for k, v in string.gmatch("a=1,b=2", "(%w+)=(%w+)") do h:add("x-kv-" .. k, v) end
    h:add("x-plain", tostring(string.find("a.-b", ".-", 1, true)))
    h:add("x-body-scan", tostring(string.find(string.rep("a", 100000) .. "needle", "needle")))
  end
end
"""

ESCAPES = [
    "/io-open",
    "/os-execute",
    "/require-socket",
    "/require-ffi",
    "/load-bytecode",
    "/string-metatable",
    "/debug-registry",
    "/rep-bomb",
    "/concat-bomb",
    "/pattern-bomb",
    "/gmatch-bomb",
    "/pattern-loop",
    "/header-bomb",
    "/spin",
]


@pytest.fixture(scope="module")
def escape_proxy(tmp_path_factory):
    upstream = HttpUpstream()
    tmp = tmp_path_factory.mktemp("lua-escape")
    marker = tmp / "pwned"
    port = free_port()
    script = ESCAPE_SCRIPT.replace("MARKER", str(marker))
    proxy = ProxyProcess(
        ["-c", _write_config(tmp, [("main", port, upstream.address, script)])]
    ).wait_ready()
    yield proxy, port, marker
    proxy.stop()
    upstream.close()


@pytest.mark.parametrize("path", ESCAPES)
def test_sandbox_escape_fails_with_500_and_the_proxy_serves_the_next_request(escape_proxy, path):
    proxy, port, marker = escape_proxy
    t0 = time.monotonic()
    status, headers, body = _get(port, path)
    elapsed = time.monotonic() - t0
    assert status == 500, (status, body)
    assert body == b"lua script error\n" and "x-leak" not in headers
    assert elapsed < 2.0, elapsed  # 0.1 s CPU per hook call; the machine may be busy
    assert not marker.exists()
    status, _, body = _get(port, "/echo")
    assert status == 200
    assert "root:" not in body.decode(errors="replace")


def test_pattern_bomb_is_refused_naming_the_pattern_and_the_limit(escape_proxy):
    proxy, port, _ = escape_proxy
    time.sleep(1.1)  # past the one-line-per-second log limit
    assert _get(port, "/pattern-bomb")[0] == 500
    deadline = time.monotonic() + 3
    while "costs up to" not in proxy.output and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 'pattern ".-.-.-.-b" costs up to' in proxy.output, proxy.output
    assert "on a 3000-byte subject (limit 10000000)" in proxy.output


def test_everyday_patterns_still_work_in_the_sandbox(escape_proxy):
    _, port, _ = escape_proxy
    status, _, body = _get(port, "/echo?patterns")
    assert status == 200
    seen = _echoed(body)["h"]
    assert seen["x-route"] == ["v1,users"]
    assert seen["x-trim"] == ["padded"]
    assert seen["x-swap"] == ["v=k"]
    assert seen["x-kv-a"] == ["1"] and seen["x-kv-b"] == ["2"]
    assert seen["x-plain"] == ["2"]  # find(..., true) is a plain search: ".-" at 2
    assert seen["x-body-scan"] == ["100001"]  # a literal search over a large subject is linear


def test_bytecode_script_is_refused_at_load(tmp_path):
    lupa = pytest.importorskip("lupa.luajit21")
    bytecode = lupa.LuaRuntime(encoding=None).eval("string.dump(function() end)")
    source = tmp_path / "compiled.lua"
    source.write_bytes(bytecode)
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"listeners:\n  - name: main\n    mode: http\n    address: 127.0.0.1:{free_port()}\n"
        f"    upstream: 127.0.0.1:9\n    filters:\n      - name: script\n        type: lua\n"
        f"        config: {{source_file: {source}}}\n"
    )
    proxy = ProxyProcess(["-c", str(path)])
    assert proxy.proc.wait(15) == 2
    time.sleep(0.05)
    assert "filters[0].config.source_file" in proxy.output
    assert "precompiled Lua bytecode is refused" in proxy.output, proxy.output


NO_CONTENT_SCRIPT = """
function envoy_on_response(handle)
  handle:headers():replace(":status", "204")
end
"""


def test_a_response_a_script_makes_a_204_loses_its_body_and_framing(start_proxy, tmp_path):
    """Regression: the upstream's body (and its Content-Length) went on after the 204; the HTTP/1
    codec refused the body, so the exchange never ended and the connection answered no more."""
    upstream = HttpUpstream()
    port = free_port()
    try:
        config = _write_config(tmp_path, [("main", port, upstream.address, NO_CONTENT_SCRIPT)])
        proxy = start_proxy("-c", config)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for method in (b"GET", b"HEAD", b"GET"):
                sock.sendall(method + b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
                data = b""
                while not data.endswith(b"\r\n\r\n"):
                    chunk = sock.recv(65536)
                    assert chunk, data
                    data += chunk
                assert data == b"HTTP/1.1 204 No Content\r\n\r\n"
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(65536) == b""
        snap = proxy.wait_for(lambda s: s["duration"]["count"] == 3)
        assert snap["responses"]["2xx"] == 3 and snap["flags"] == {}
    finally:
        upstream.close()
