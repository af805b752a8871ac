"""Envoy's Lua filter documentation examples, run unchanged through a running pyproxy with curl and
real upstreams, and the rest of Envoy's handle API (dynamic metadata, stream info, httpCall,
base64Escape, timestamps, signatures)."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import pytest
from conftest import ProxyProcess, curl, free_port, split_response, start_listener
from http_peer import HttpUpstream
from test_filters_lua import _get, _write_config

# ---- the scripts, as Envoy's documentation prints them -----------------------------------------

DOC_BODY_SIZE = """
-- Called on the request path.
function envoy_on_request(request_handle)
  -- Wait for the entire request body and add a request header with the body size.
  request_handle:headers():add("request_body_size", request_handle:body():length())
end

-- Called on the response path.
function envoy_on_response(response_handle)
  -- Wait for the entire response body and add a response header with the body size.
  response_handle:headers():add("response_body_size", response_handle:body():length())
  -- Remove a response header named 'foo'
  response_handle:headers():remove("foo")
end
"""

DOC_HTTP_CALL = """
function envoy_on_request(request_handle)
  -- Make an HTTP call to an upstream host with the following headers, body, and timeout.
  local headers, body = request_handle:httpCall(
  "lua_cluster",
  {
    [":method"] = "POST",
    [":path"] = "/",
    [":authority"] = "lua_cluster"
  },
  "hello world",
  5000)

  -- Add information from the HTTP call into the headers that are about to be sent to the next
  -- filter in the filter chain.
  request_handle:headers():add("upstream_foo", headers["foo"])
  request_handle:headers():add("upstream_body_size", #body)
end
"""

DOC_HTTP_CALL_RESPOND = """
function envoy_on_request(request_handle)
  -- Make an HTTP call.
  local headers, body = request_handle:httpCall(
  "lua_cluster",
  {
    [":method"] = "POST",
    [":path"] = "/",
    [":authority"] = "lua_cluster",
    ["set-cookie"] = { "lang=lua; Path=/", "type=binding; Path=/" }
  },
  "hello world",
  5000)

  -- Response directly and set a header from the HTTP call. No further filter iteration
  -- occurs.
  request_handle:respond(
    {[":status"] = "403",
     ["upstream_foo"] = headers["foo"]},
    "nope")
end
"""

DOC_LOG = """
function envoy_on_request(request_handle)
  -- Log information about the request
  request_handle:logInfo("Authority: "..request_handle:headers():get(":authority"))
  request_handle:logInfo("Method: "..request_handle:headers():get(":method"))
  request_handle:logInfo("Path: "..request_handle:headers():get(":path"))
end

function envoy_on_response(response_handle)
  -- Log response status code
  response_handle:logInfo("Status: "..response_handle:headers():get(":status"))
end
"""

DOC_SET_BYTES = """
function envoy_on_response(response_handle)
  response_handle:body():setBytes("<html><b>Not Found<b></html>")
  response_handle:headers():replace("content-type", "text/html")
end
"""

DOC_BODY_CHUNKS = """
function envoy_on_response(response_handle)

  -- Sets the content-type.
  response_handle:headers():replace("content-type", "text/html")

  local last
  for chunk in response_handle:bodyChunks() do
    -- Clears each received chunk.
    chunk:setBytes("")
    last = chunk
  end

  last:setBytes("<html><b>Not Found<b></html>")
end
"""

DOC_DYNAMIC_METADATA = """
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  request_handle:streamInfo():dynamicMetadata():set("envoy.filters.http.lua", "request.info", {
    auth = headers:get("authorization"),
    token = headers:get("x-request-token"),
  })
end

function envoy_on_response(response_handle)
  local meta = response_handle:streamInfo():dynamicMetadata():get("envoy.filters.http.lua")["request.info"]
  response_handle:logInfo("Auth: "..meta.auth..", token: "..meta.token)
end
"""

# The rest of the handle API, reported in response headers.
HANDLE_API = """
function envoy_on_request(handle)
  local info = handle:streamInfo()
  info:dynamicMetadata():set("pyproxy.test", "n", 7)
  handle:headers():add("x-local", info:downstreamLocalAddress())
  handle:headers():add("x-remote", info:downstreamDirectRemoteAddress())
  handle:headers():add("x-cx-remote", handle:connectionStreamInfo():downstreamRemoteAddress())
  handle:headers():add("x-sni", "[" .. info:requestedServerName() .. "]")
  handle:headers():add("x-ssl", tostring(info:downstreamSslConnection()))
  handle:headers():add("x-b64", handle:base64Escape("\\0\\1binary\\255"))
  handle:headers():add("x-ms", handle:timestamp())
  handle:headers():add("x-us", handle:timestampString(EnvoyTimestampResolution.MICROSECOND))
  handle:clearRouteCache()
  if handle:headers():get(":path") == "/missing" then
    handle:streamInfo():filterState()
  end
  if handle:headers():get(":path") == "/async" then
    handle:httpCall("lua_cluster", {[":method"] = "GET", [":path"] = "/async",
      [":authority"] = "lua_cluster"}, nil, 1000, true)
  end
end

function envoy_on_response(handle)
  local n = 0
  for ns, entry in pairs(handle:streamInfo():dynamicMetadata()) do n = n + entry["n"] end
  handle:headers():add("x-meta", handle:streamInfo():dynamicMetadata():get("pyproxy.test")["n"] .. "/" .. n)
end
"""


class FooUpstream(HttpUpstream):
    """The callout cluster: answers every request with a `foo` header and a fixed body."""

    def _respond(self, conn, h, request, body) -> bool:
        self.requests.append(
            {
                "path": request.target.decode(),
                "method": request.method.decode(),
                "headers": [(n.decode(), v.decode()) for n, v in request.headers],
                "body": bytes(body),
            }
        )
        self._send(conn, h, 200, b"twelve bytes", [("foo", "bar")])
        return True


SCRIPTS = {
    "body_size": DOC_BODY_SIZE,
    "http_call": DOC_HTTP_CALL,
    "http_call_respond": DOC_HTTP_CALL_RESPOND,
    "log": DOC_LOG,
    "set_bytes": DOC_SET_BYTES,
    "body_chunks": DOC_BODY_CHUNKS,
    "signature": "",  # made by the fixture: it embeds a fresh key and signature
    "dynamic_metadata": DOC_DYNAMIC_METADATA,
    "handle_api": HANDLE_API,
}


@pytest.fixture(scope="module")
def envoy_proxy(tmp_path_factory):
    """One proxy, a listener per script, the `lua_cluster` callout cluster and one upstream."""
    upstream, cluster = HttpUpstream(), FooUpstream("lua_cluster")
    tmp = tmp_path_factory.mktemp("lua_envoy")
    ports = {name: free_port() for name in SCRIPTS}
    scripts = dict(SCRIPTS, signature=_signature_script())
    path = Path(
        _write_config(
            tmp, [(name, ports[name], upstream.address, scripts[name]) for name in SCRIPTS]
        )
    )
    path.write_text(
        f"clusters:\n  lua_cluster:\n    endpoints: [{cluster.address}]\n" + path.read_text()
    )
    proxy = ProxyProcess(["-c", str(path)]).wait_ready()
    yield proxy, ports, upstream, cluster
    proxy.stop()
    upstream.close()
    cluster.close()


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def _signature_script() -> str:
    """importPublicKey/verifySignature on a fresh RSA key: the signed text passes, another fails."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(b"signed text", padding.PKCS1v15(), hashes.SHA256())
    return f"""
function envoy_on_request(handle)
  local der, sig = {_lua_string(der)}, {_lua_string(signature)}
  local key = handle:importPublicKey(der, string.len(der))
  local text = handle:headers():get("x-text")
  local ok, err = handle:verifySignature("sha256", key, sig, string.len(sig), text, string.len(text))
  handle:respond({{[":status"] = ok and "200" or "401"}}, ok and "verified" or err)
end
"""


def _wait_for(proxy, text: str) -> None:
    deadline = time.monotonic() + 5
    while text not in proxy.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in proxy.output, proxy.output[-2000:]


def test_doc_body_size(envoy_proxy):
    proxy, ports, upstream, _ = envoy_proxy
    status, headers, body = split_response(
        curl("-D", "-", "-d", "0123456789", f"http://127.0.0.1:{ports['body_size']}/echo").stdout
    )
    assert status == 200
    assert ["request_body_size", "10"] in json.loads(body)["headers"]
    assert headers["response_body_size"] == str(len(body))


def test_doc_http_call_adds_the_answer_to_the_request(envoy_proxy):
    proxy, ports, upstream, cluster = envoy_proxy
    status, _, body = _get(ports["http_call"], "/echo")
    assert status == 200
    sent = json.loads(body)["headers"]
    assert ["upstream_foo", "bar"] in sent and ["upstream_body_size", "12"] in sent
    asked = cluster.requests[-1]
    assert (asked["method"], asked["path"], asked["body"]) == ("POST", "/", b"hello world")
    assert ("host", "lua_cluster") in asked["headers"]


def test_doc_http_call_then_respond(envoy_proxy):
    proxy, ports, upstream, cluster = envoy_proxy
    before = len(upstream.requests)
    status, headers, body = _get(ports["http_call_respond"], "/echo")
    assert (status, body, headers["upstream_foo"]) == (403, b"nope", "bar")
    cookies = [v for k, v in cluster.requests[-1]["headers"] if k == "set-cookie"]
    assert cookies == ["lang=lua; Path=/", "type=binding; Path=/"]
    assert len(upstream.requests) == before  # answered locally, never forwarded


def test_doc_log(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    assert _get(ports["log"], "/logged?doc")[0] == 200
    _wait_for(proxy, "Path: /logged?doc")
    _wait_for(proxy, "Status: 200")


def test_doc_set_bytes(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    status, headers, body = _get(ports["set_bytes"], "/echo")  # a response with a body
    assert (status, body) == (200, b"<html><b>Not Found<b></html>")
    assert headers["content-type"] == "text/html"


def test_doc_body_chunks(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    status, headers, body = _get(ports["body_chunks"], "/echo")
    assert (status, body) == (200, b"<html><b>Not Found<b></html>")
    assert headers["content-type"] == "text/html"


def test_signature_verified_with_an_imported_public_key(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    assert _get(ports["signature"], "/", "-H", "x-text: signed text")[:3:2] == (200, b"verified")
    status, _, body = _get(ports["signature"], "/", "-H", "x-text: other text")
    assert (status, body) == (401, b"Failed to verify digest. Error code: 0")


def test_doc_dynamic_metadata_reaches_the_response(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    status, _, _ = _get(
        ports["dynamic_metadata"], "/echo", "-H", "authorization: a1", "-H", "x-request-token: t9"
    )
    assert status == 200
    _wait_for(proxy, "Auth: a1, token: t9")


def test_handle_api_stream_info_encoding_and_time(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    before_ms = int(time.time() * 1000)
    status, headers, body = _get(ports["handle_api"], "/echo")
    assert status == 200
    sent = dict(json.loads(body)["headers"])
    assert sent["x-local"] == f"127.0.0.1:{ports['handle_api']}"
    assert sent["x-remote"].startswith("127.0.0.1:") and sent["x-remote"] == sent["x-cx-remote"]
    assert (sent["x-sni"], sent["x-ssl"]) == ("[]", "nil")
    assert base64.b64decode(sent["x-b64"]) == b"\0\1binary\xff"
    assert before_ms <= int(sent["x-ms"]) <= int(time.time() * 1000)
    assert abs(int(sent["x-us"]) // 1000 - int(sent["x-ms"])) < 1000
    assert headers["x-meta"] == "7/7"


def test_async_http_call_goes_on_at_once(envoy_proxy):
    proxy, ports, _, cluster = envoy_proxy
    assert _get(ports["handle_api"], "/async")[0] == 200
    deadline = time.monotonic() + 5
    while not any(r["path"] == "/async" for r in cluster.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(r["path"] == "/async" for r in cluster.requests)


def test_unsupported_method_is_a_named_script_error(envoy_proxy):
    proxy, ports, _, _ = envoy_proxy
    status, _, body = _get(ports["handle_api"], "/missing")
    assert status == 500
    _wait_for(proxy, "streamInfo:filterState() is not supported by pyproxy")


def test_dynamic_metadata_reaches_a_later_filter_and_the_access_log(start_proxy, tmp_path):
    upstream = HttpUpstream()
    log_path = tmp_path / "access.log"
    setter = (
        'function envoy_on_request(h) h:streamInfo():dynamicMetadata():set("ns", "user", "ann") end'
    )
    reader = (
        "function envoy_on_request(h)\n"
        '  h:headers():add("x-user", h:streamInfo():dynamicMetadata():get("ns")["user"])\nend'
    )
    body = (
        f"    http:\n      access_log: {log_path}\n    filters:\n"
        f"      - {{name: setter, type: lua, config: {{inline_code: {json.dumps(setter)}}}}}\n"
        f"      - {{name: reader, type: lua, config: {{inline_code: {json.dumps(reader)}}}}}\n"
    )
    try:
        proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
        status, _, sent = _get(port, "/echo")
        assert status == 200 and ["x-user", "ann"] in json.loads(sent)["headers"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (log_path.exists() and log_path.read_text()):
            time.sleep(0.05)
        record = json.loads(log_path.read_text().splitlines()[0])
        assert record["dynamic_metadata"] == {"ns": {"user": "ann"}}
    finally:
        upstream.close()


def test_trailers_after_body_are_read_and_edited(start_proxy, tmp_path):
    script = (
        "function envoy_on_request(h)\n"
        "  local size = h:body():length()\n"
        "  local t = h:trailers()\n"
        '  h:headers():add("x-trailer-seen", t and t:get("x-trailer") or "none")\n'
        '  if t then t:replace("x-trailer", "edited") end\nend'
    )
    upstream = HttpUpstream()
    body = f"    filters:\n      - {{name: t, type: lua, config: {{inline_code: {json.dumps(script)}}}}}\n"
    try:
        proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nx-trailer: t1\r\n\r\n"
            )
            answer = b""
            while b"}" not in answer:
                chunk = conn.recv(65536)
                assert chunk, answer
                answer += chunk
        status, _, sent = split_response(answer)
        assert status == 200
        assert ["x-trailer-seen", "t1"] in json.loads(sent)["headers"]
        status, _, sent = _get(port, "/echo", "-d", "no trailers")  # trailers() is nil
        assert status == 200 and ["x-trailer-seen", "none"] in json.loads(sent)["headers"]
    finally:
        upstream.close()


def test_route_metadata_under_the_filter_name_and_route_name(start_proxy, tmp_path):
    script = (
        "function envoy_on_request(h)\n"
        '  h:headers():add("x-owner", h:metadata():get("owner") or "none")\n'
        '  h:headers():add("x-tier", h:route():metadata():get("tier") or "none")\n'
        '  h:headers():add("x-route-name", "[" .. h:streamInfo():routeName() .. "]")\nend'
    )
    upstream = HttpUpstream()
    body = (
        "    routes:\n"
        "      - name: gold-route\n"
        "        match: {authority: meta.test}\n"
        "        metadata: {tagger: {owner: team-a, tier: gold}}\n"
        "      - match: {prefix: /}\n"
        f"    filters:\n      - {{name: tagger, type: lua, config: {{inline_code: {json.dumps(script)}}}}}\n"
    )
    try:
        proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
        sent = dict(json.loads(_get(port, "/echo", "-H", "host: meta.test")[2])["headers"])
        assert (sent["x-owner"], sent["x-tier"]) == ("team-a", "gold")
        assert sent["x-route-name"] == "[gold-route]"
        sent = dict(json.loads(_get(port, "/echo")[2])["headers"])
        assert (sent["x-owner"], sent["x-tier"]) == ("none", "none")
        assert sent["x-route-name"] == "[]"  # an unnamed route, as in Envoy
    finally:
        upstream.close()


CLEAR_ROUTE_CACHE = """
function envoy_on_request(h)
  local hs = h:headers()
  hs:add("x-before", h:streamInfo():routeName() .. "," .. (h:filterContext().greeting or "none"))
  if hs:get("x-to") == "v2" then
    hs:replace(":path", "/v2" .. hs:get(":path"))
    if hs:get("x-clear") then h:clearRouteCache() end
  end
  hs:add("x-after", h:streamInfo():routeName() .. "," .. (h:filterContext().greeting or "none"))
end
"""


def test_clear_route_cache_matches_the_edited_request_again(start_proxy, tmp_path):
    """Envoy's rule: a changed path routes anew only after clearRouteCache(); the route's
    name, filter_context (LuaPerRoute) and cluster are then the new route's."""
    default, v2 = HttpUpstream(), HttpUpstream()
    body = (
        "    routes:\n"
        "      - name: v2-route\n"
        "        match: {prefix: /v2}\n"
        "        cluster: v2\n"
        "        filter_context: {router: {greeting: hello-v2}}\n"
        "      - name: default\n"
        "        match: {prefix: /}\n"
        "        filter_context: {router: {greeting: hello-default}}\n"
        f"    filters:\n      - {{name: router, type: lua, config: {{inline_code: {json.dumps(CLEAR_ROUTE_CACHE)}}}}}\n"
    )
    top = f"clusters:\n  v2:\n    endpoints: [{v2.address}]\n"
    try:
        proxy, port = start_listener(start_proxy, tmp_path, default.address, body, top=top)

        def sent(*headers: str) -> tuple[str, dict]:
            """The path and headers of the request as the upstream that got it saw them."""
            args = [a for h in headers for a in ("-H", h)]
            counts = len(default.requests), len(v2.requests)
            _get(port, "/echo", *args)
            grew = [u for u, n in zip((default, v2), counts, strict=True) if len(u.requests) > n]
            assert len(grew) == 1
            got = grew[0].requests[-1]
            return got["path"], dict(got["headers"])

        path, headers = sent()
        assert path == "/echo" and len(default.requests) == 1 and not v2.requests
        assert headers["x-before"] == headers["x-after"] == "default,hello-default"
        path, headers = sent("x-to: v2")  # changed, not cleared: the route stays
        assert path == "/v2/echo" and len(default.requests) == 2 and not v2.requests
        assert headers["x-after"] == "default,hello-default"
        path, headers = sent("x-to: v2", "x-clear: 1")  # cleared: matched again
        assert path == "/v2/echo" and len(default.requests) == 2 and len(v2.requests) == 1
        assert headers["x-before"] == "default,hello-default"
        assert headers["x-after"] == "v2-route,hello-v2"
    finally:
        default.close()
        v2.close()
