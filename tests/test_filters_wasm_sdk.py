"""Proxy-Wasm modules built by the AssemblyScript SDK (not hand-written) through a running pyproxy,
with curl and a real upstream: headers, local response, http_call, metrics and shared data."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time

import h11
import pytest
from conftest import curl, free_port, http_get, split_response, start_listener
from http_peer import HttpUpstream
from wasm_sdk import assemblyscript_module

pytest.importorskip("wasmtime")


@pytest.fixture(scope="module")
def upstream():
    server = HttpUpstream()
    yield server
    server.close()


def _sdk_proxy(
    start_proxy,
    tmp_path,
    upstream,
    module: str,
    root_id: str,
    extra: str = "",
    top: str = "",
    mode: str = "http",
):
    """A proxy running the SDK-built module. This SDK version reads its plugin configuration
    passing the size where the host writes the returned size, so, as in Envoy, it needs one."""
    extra = extra or "configuration: enabled"
    wasm = assemblyscript_module(module)
    filters = f"""    filters:
      - name: {module}
        type: wasm
        config:
          root_id: {root_id}
          vm_config: {{code: {{local: {{filename: {wasm}}}}}}}
          {extra}
"""
    return start_listener(start_proxy, tmp_path, upstream.address, filters, mode=mode, top=top)


def test_wasi_unstable_import_is_provided(tmp_path):
    """The SDK's runtime imports wasi_unstable.proc_exit (--use abort=abort_proc_exit): it loads."""
    import wasmtime

    module = wasmtime.Module.from_file(wasmtime.Engine(), str(assemblyscript_module("headers")))
    assert ("wasi_unstable", "proc_exit") in {(i.module, i.name) for i in module.imports}
    from pyproxy.filters.wasm import WasmFactory

    config = WasmFactory.validate(
        {"root_id": "add_header", "wasm_file": str(module_path := assemblyscript_module("headers"))}
    )
    assert config["root_id"] == "add_header" and module_path.exists()


def test_headers_example_adds_request_and_response_headers(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(
        start_proxy, tmp_path, upstream, "headers", "add_header", "configuration: from-config"
    )
    for _ in range(3):  # each request in the same instance: the guest's heap stays sound
        status, headers, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
        assert (status, headers["hello"]) == (200, "from-config")
        assert ["x-as-request", "seen"] in json.loads(body)["headers"]


def test_local_response_example_answers_without_the_upstream(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "local_response", "deny")
    before = len(upstream.requests)
    status, headers, body = split_response(curl("-i", f"http://127.0.0.1:{port}/denied").stdout)
    assert (status, body) == (403, b"no token\n")
    assert headers["x-denied-by"] == "as-sdk"
    assert len(upstream.requests) == before  # never forwarded
    status, _, _ = split_response(
        curl("-i", "-H", "x-token: t", f"http://127.0.0.1:{port}/allowed").stdout
    )
    assert status == 200
    assert upstream.requests[-1]["path"] == "/allowed"


def test_http_call_example_asks_the_auth_cluster_then_continues(start_proxy, tmp_path, upstream):
    auth = HttpUpstream("auth")
    try:
        top = f"clusters:\n  auth:\n    endpoints: [{auth.address}]\n"
        proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "http_call", "auth", top=top)
        status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
        assert status == 200
        assert ["x-auth-answer", "ok:/check:auth"] in json.loads(body)["headers"]
        asked = auth.requests[-1]
        assert asked["path"] == "/check"
        assert ("x-asked-for", "/echo") in asked["headers"]
        assert ("host", "auth") in asked["headers"]
    finally:
        auth.close()


def test_http_call_example_denies_when_the_cluster_is_down(start_proxy, tmp_path, upstream):
    top = f"clusters:\n  auth:\n    endpoints: [127.0.0.1:{free_port()}]\n"
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "http_call", "auth", top=top)
    before = len(upstream.requests)
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert (status, body) == (403, b"auth said \n")
    assert len(upstream.requests) == before


def test_http_call_to_an_unknown_cluster_is_refused_to_the_guest(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "http_call", "auth")
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert (status, body) == (503, b"no auth cluster\n")


def test_metrics_example_counts_requests(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "metrics", "metrics")
    seen = [
        split_response(curl("-i", f"http://127.0.0.1:{port}/x").stdout)[1]["x-requests"]
        for _ in range(3)
    ]
    assert seen == ["1", "2", "3"]


def test_metrics_example_is_visible_in_stats_and_prometheus(start_proxy, tmp_path, upstream):
    """Defined metrics reach /stats (JSON and text) and Prometheus under the names the module gave,
    summed over the workers: a counter, a gauge back at 0, a histogram's count and sum."""
    proxy, port = _sdk_proxy(
        start_proxy, tmp_path, upstream, "metrics", "metrics", top="concurrency: 2\n"
    )
    for path in ("/x", "/yy", "/zzz", "/x"):
        assert split_response(curl("-i", f"http://127.0.0.1:{port}{path}").stdout)[0] == 200
    metrics = proxy.stats()["wasm_metrics"]
    assert metrics["as_requests_total"] == {"type": "counter", "value": 4}
    assert metrics["as_in_flight"] == {"type": "gauge", "value": 0}
    assert metrics["as_path_length"] == {"type": "histogram", "count": 4, "sum": 2 + 3 + 4 + 2}
    _, text = http_get(proxy.admin + "/stats")
    assert "as_requests_total: 4\n" in text.decode()
    assert "as_path_length: count=4 sum=11\n" in text.decode()
    _, exposition = http_get(proxy.admin + "/stats/prometheus")
    lines = exposition.decode().splitlines()
    assert "as_requests_total 4.0" in lines
    assert "as_in_flight 0.0" in lines
    assert "as_path_length_count 4.0" in lines and "as_path_length_sum 11.0" in lines


def test_shared_data_example_counts_hits_per_path(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "shared_data", "hits")
    hits = [
        split_response(curl("-i", f"http://127.0.0.1:{port}{path}").stdout)[1]["x-hits"]
        for path in ("/a", "/a", "/b", "/a")
    ]
    assert hits == ["1", "2", "1", "3"]


def test_local_response_example_answers_grpc_with_its_status(start_proxy, tmp_path, upstream):
    """In a gRPC listener the reply is trailers-only with the module's grpc-status and details."""
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "local_response", "deny", mode="grpc")
    run = curl(
        "-i",
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/grpc",
        "-d",
        "",
        f"http://127.0.0.1:{port}/pkg.Svc/M",
    )
    status, headers, _ = split_response(run.stdout)
    assert (status, headers.get("grpc-status")) == (200, "7"), run.stdout + run.stderr
    assert headers.get("grpc-message") == "missing_token"


def _h11_exchange(port: int, request: h11.Request, chunks=(), trailers=()):
    """One HTTP/1.1 exchange over a real socket with h11 (curl sends no request trailers):
    (response, body, response trailers)."""
    client = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        out = client.send(request)
        for chunk in chunks:
            out += client.send(h11.Data(data=chunk))
        out += client.send(h11.EndOfMessage(headers=list(trailers)))
        sock.sendall(out)
        response, body, end = None, bytearray(), None
        while end is None:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                end = event
    assert response is not None
    return response, bytes(body), [(n.decode(), v.decode()) for n, v in end.headers]


def test_body_example_rewrites_a_buffered_request_body(start_proxy, tmp_path, upstream):
    """Pause on each chunk buffers the request body (StopIterationAndBuffer); at its end the
    module reads it whole and replaces it (set_buffer_bytes, a different length)."""
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "body", "body")
    sent = b"the secret is " + b"x" * 3000 + b" and another secret"
    expected = sent.replace(b"secret", b"[redacted]")
    # Content-Length framed (curl) and chunked in several pieces (h11): the same rewrite.
    status, _, body = split_response(
        curl("-i", "--data-binary", sent.decode(), f"http://127.0.0.1:{port}/echo").stdout
    )
    assert status == 200, proxy.output
    echo = json.loads(body.partition(b"\n-- seen by as-sdk\n")[0])
    assert echo["body_length"] == len(expected)
    assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert "content-length" not in dict(echo["headers"])  # the module removed it
    head = h11.Request(
        method="POST",
        target="/echo",
        headers=[("host", "x"), ("transfer-encoding", "chunked")],
    )
    pieces = [sent[i : i + 700] for i in range(0, len(sent), 700)]
    response, body, _ = _h11_exchange(port, head, pieces)
    echo = json.loads(body.partition(b"\n-- seen by as-sdk\n")[0])
    assert response.status_code == 200
    assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()


def test_body_example_appends_to_the_streamed_response_body(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "body", "body")
    status, headers, body = split_response(
        curl("-i", f"http://127.0.0.1:{port}/chunked?n=3").stdout
    )
    assert status == 200
    assert body == b"c" * 3000 + b"\n-- seen by as-sdk\n"
    status, headers, body = split_response(curl("-i", f"http://127.0.0.1:{port}/other").stdout)
    assert "content-length" not in headers  # removed by the module: the body grows after
    assert body == b"ok:/other:up\n-- seen by as-sdk\n"


def test_trailers_example_reads_and_edits_both_directions(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "trailers", "trailers")
    head = h11.Request(
        method="POST",
        target="/trailers",
        headers=[("host", "x"), ("transfer-encoding", "chunked"), ("te", "trailers")],
    )
    response, body, trailers = _h11_exchange(port, head, [b"abc"], [("x-checksum", "c0ffee")])
    assert (response.status_code, body) == (200, b"body"), proxy.output
    assert upstream.requests[-1]["trailers"] == [("x-checksum", "c0ffee"), ("x-checked", "c0ffee")]
    assert trailers == [("x-upstream-trailer", "t1"), ("x-as-trailer", "count=2")]


def test_properties_example_reads_envoys_attributes(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "properties", "properties")
    run = curl("-i", "-A", "probe/1", f"http://127.0.0.1:{port}/echo?q=1")
    status, headers, _ = split_response(run.stdout)
    assert status == 200, proxy.output
    assert headers["x-plugin"] == "properties/properties"  # filter name / root id
    assert headers["x-request"] == "GET /echo q=1 HTTP/1.1 probe/1"
    source, source_port = headers["x-source"].split()
    assert source.startswith("127.0.0.1:") and source.endswith(f":{source_port}")
    assert headers["x-destination"] == f"127.0.0.1:{port} {port}"
    upstream_port = upstream.address.rsplit(":", 1)[1]
    assert headers["x-upstream"] == f"{upstream.address} {upstream_port}"
    assert (headers["x-code"], headers["x-direction"]) == ("200", "0")  # standalone listener


def _pb(number: int, inner_hex: str) -> str:
    """A short protobuf length-delimited field, in hex: what the tests expect Envoy to send."""
    return bytes([number << 3 | 2, len(inner_hex) // 2]).hex() + inner_hex


def _pb_string(number: int, text: str) -> str:
    return _pb(number, text.encode().hex())


def test_attributes_of_node_connection_route_and_outcome(
    start_proxy, tmp_path, upstream, monkeypatch
):
    """node (from the pod identity), connection.id, route_name/route_metadata, cluster_name,
    response.flags/code_details and dynamic metadata (set by a Lua filter before the module),
    encoded as Envoy encodes them; request.duration once the request has ended."""
    monkeypatch.setenv("POD_NAME", "web-1")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    monkeypatch.setenv("POD_IP", "10.0.0.7")
    monkeypatch.delenv("PYPROXY_NODE_ID", raising=False)
    monkeypatch.delenv("PYPROXY_NODE_CLUSTER", raising=False)
    wasm = assemblyscript_module("properties")
    body = f"""    routes:
      - name: to-web
        match: {{prefix: /}}
        metadata: {{attrs: {{team: blue}}}}
    filters:
      - name: meta
        type: lua
        config:
          inline_code: |
            function envoy_on_request(h) h:streamInfo():dynamicMetadata():set("ns", "k", "v") end
      - name: attrs
        type: wasm
        config:
          root_id: properties
          configuration: enabled
          vm_config: {{code: {{local: {{filename: {wasm}}}}}}}
"""
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
    # Two requests on one connection (curl reuses it), then one on another.
    run = curl("-i", f"http://127.0.0.1:{port}/a", "-:", "-i", f"http://127.0.0.1:{port}/b")
    first, second = re.split(rb"(?=HTTP/1\.1 \d{3} )", run.stdout)[1:3]
    _, h1, _ = split_response(first)
    _, h2, _ = split_response(second)
    _, h3, _ = split_response(curl("-i", f"http://127.0.0.1:{port}/c").stdout)
    node_id = "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local"
    assert h1["x-node"] == f"{node_id} shop web-1"
    # Node: id (1), cluster (2), metadata (3): a Struct whose first field is NAME.
    assert h1["x-node-pb"].startswith(_pb_string(1, node_id) + _pb_string(2, "shop") + "1a")
    assert b"web-1".hex() in h1["x-node-pb"]
    conn1, sni = h1["x-connection"].split()
    assert sni == "[]" and int(conn1) > 0
    assert h2["x-connection"] == h1["x-connection"]  # the same connection
    assert h3["x-connection"] != h1["x-connection"]
    # Metadata: filter_metadata (1) {"attrs": Struct {"team": string_value "blue"}}.
    struct = _pb(1, _pb_string(1, "team") + _pb(2, _pb_string(3, "blue")))
    assert h1["x-route"] == "to-web " + _pb(1, _pb_string(1, "attrs") + _pb(2, struct))
    assert h1["x-cluster"] == "main-upstream main-upstream"
    assert h1["x-outcome"] == "0 via_upstream"
    assert _pb_string(1, "ns") in h1["x-metadata"] and _pb_string(3, "v") in h1["x-metadata"]
    deadline = time.monotonic() + 3
    while proxy.output.count("ended: duration=") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    ended = [line for line in proxy.output.splitlines() if "ended: duration=" in line]
    assert len(ended) == 3, proxy.output
    durations = [int(line.split("duration=")[1].split()[0]) for line in ended]
    assert all(0 < d < 5_000_000_000 for d in durations)  # nanoseconds
    assert all(" flags=0 " in line for line in ended)


class _GrpcEcho:
    """A real grpcio server: test.Echo/Unary answers b"pong:" + the request (raw bytes, no
    protobuf), with `x-server` initial metadata; a request naming /fail is refused.
    test.Echo/Chat (a bidirectional stream) answers each message as it comes, and ends with
    `x-count` (how many came) in its trailing metadata once the client half-closes."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc

        self.metadata: list[dict] = []

        def unary(request: bytes, context) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            if request.startswith(b"/fail"):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for /fail")
            context.send_initial_metadata((("x-server", "grpcio"),))
            return b"pong:" + request

        def chat(requests, context):
            self.metadata.append(dict(context.invocation_metadata()))
            context.send_initial_metadata((("x-server", "grpcio"),))
            count = 0
            for request in requests:
                count += 1
                yield b"pong:" + request
            context.set_trailing_metadata((("x-count", str(count)),))

        handler = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Chat": grpc.stream_stream_rpc_method_handler(chat),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None)


def test_grpc_call_module_asks_a_grpcio_server_then_continues(start_proxy, tmp_path, upstream):
    pytest.importorskip("grpc")
    echo = _GrpcEcho()
    try:
        top = f"clusters:\n  echo:\n    endpoints: [127.0.0.1:{echo.port}]\n"
        proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "grpc_call", "grpc_call", top=top)
        status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
        assert status == 200, proxy.output
        headers = dict(json.loads(body)["headers"])
        assert headers["x-grpc-answer"] == "pong:/echo"
        assert headers["x-grpc-server"] == "grpcio"
        assert echo.metadata[-1]["x-asked-for"] == "/echo"
        # The server's refusal reaches the module as its status and message.
        status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/fail").stdout)
        assert (status, body) == (503, b"grpc status 7: no entry for /fail\n")
    finally:
        echo.close()


def _events(port: int, want: str) -> list[str]:
    """The grpc_stream module's /events lines, once `want` is among them (callbacks come later)."""
    deadline = time.monotonic() + 5
    while True:
        status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/events").stdout)
        assert status == 200
        lines = body.decode().splitlines()
        if any(line.startswith(want) for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _say(port: int, path: str) -> str:
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}{path}").stdout)
    assert status == 200, body
    return body.decode().strip()


def test_grpc_stream_module_talks_to_a_grpcio_stream(start_proxy, tmp_path, upstream):
    """proxy_grpc_stream/send/close and the four stream callbacks, against grpcio's Chat: each
    message answered as it goes (the stream stays open across requests), then half-close
    brings the trailing metadata and close with OK."""
    pytest.importorskip("grpc")
    echo = _GrpcEcho()
    try:
        top = f"clusters:\n  echo:\n    endpoints: [127.0.0.1:{echo.port}]\n"
        proxy, port = _sdk_proxy(
            start_proxy, tmp_path, upstream, "grpc_stream", "grpc_stream", top=top
        )
        sent = _say(port, "/send/one")
        assert sent.startswith("sent ") and sent.endswith(" 0"), sent
        token = sent.split()[1]
        assert _events(port, "message") == [
            f"initial {token} x-server=grpcio",
            f"message {token} pong:one",
        ]
        assert echo.metadata[-1]["x-opened-by"] == "wasm"
        assert _say(port, "/send/two") == f"sent {token} 0"  # the same stream, still open
        assert _events(port, f"message {token} pong:two")[-1] == f"message {token} pong:two"
        assert _say(port, "/close") == "close 0"
        assert _events(port, "close")[-2:] == [
            f"trailing {token} x-count=2",
            f"close {token} 0 ",
        ]
        # Closed by the server: the token is gone (NOT_FOUND).
        assert _say(port, "/close") == "close 1"
    finally:
        echo.close()


def test_grpc_stream_cancel_ends_it_without_callbacks(start_proxy, tmp_path, upstream):
    pytest.importorskip("grpc")
    echo = _GrpcEcho()
    try:
        top = f"clusters:\n  echo:\n    endpoints: [127.0.0.1:{echo.port}]\n"
        proxy, port = _sdk_proxy(
            start_proxy, tmp_path, upstream, "grpc_stream", "grpc_stream", top=top
        )
        token = _say(port, "/send/one").split()[1]
        _events(port, "message")
        assert _say(port, "/cancel") == "cancel 0"
        time.sleep(0.3)
        lines = _events(port, "nothing")
        assert not [line for line in lines if line.startswith(("close", "trailing"))], lines
        assert _say(port, "/cancel") == "cancel 1"  # the token is gone
        # A new stream works after it.
        again = _say(port, "/send/again").split()[1]
        assert again != token
        # Wait for this stream's own message: the first stream's is still listed.
        assert f"message {again} pong:again" in _events(port, f"message {again}")
    finally:
        echo.close()


def test_grpc_stream_to_a_down_cluster_closes_unavailable(start_proxy, tmp_path, upstream):
    top = f"clusters:\n  echo:\n    endpoints: [127.0.0.1:{free_port()}]\n"
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "grpc_stream", "grpc_stream", top=top)
    token = _say(port, "/send/one").split()[1]
    assert _events(port, "close")[-1].startswith(f"close {token} 14 ")
    # Closed by the other side only: the token stays until the guest closes its own side.
    assert _say(port, "/close") == "close 0"
    assert _say(port, "/close") == "close 1"


def test_grpc_stream_to_an_unknown_cluster_is_refused_to_the_guest(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "grpc_stream", "grpc_stream")
    assert _say(port, "/send/one") == "stream refused 2"  # BAD_ARGUMENT, as Envoy
    assert _say(port, "/close") == "close 1"  # no such token: NOT_FOUND


def test_grpc_call_module_hears_unavailable_when_the_cluster_is_down(
    start_proxy, tmp_path, upstream
):
    top = f"clusters:\n  echo:\n    endpoints: [127.0.0.1:{free_port()}]\n"
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "grpc_call", "grpc_call", top=top)
    before = len(upstream.requests)
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert status == 503 and body.startswith(b"grpc status 14: "), body
    assert len(upstream.requests) == before


def test_grpc_call_to_an_unknown_cluster_is_refused_to_the_guest(start_proxy, tmp_path, upstream):
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "grpc_call", "grpc_call")
    status, _, body = split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)
    assert (status, body) == (503, b"no echo cluster\n")


def test_a_body_buffered_past_the_limit_is_refused(start_proxy, tmp_path, upstream):
    """Pause on every chunk buffers the body; past the chain's 1 MiB limit the answer is 413."""
    proxy, port = _sdk_proxy(start_proxy, tmp_path, upstream, "body", "body")
    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * (2 * 1024 * 1024))
    run = curl("-i", "-H", "Expect:", "--data-binary", f"@{big}", f"http://127.0.0.1:{port}/echo")
    assert split_response(run.stdout)[0] == 413
    assert split_response(curl("-i", f"http://127.0.0.1:{port}/echo").stdout)[0] == 200
