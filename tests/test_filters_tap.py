"""The tap filter through a real proxy: records match what was sent, matchers, drops, admin streaming."""

from __future__ import annotations

import base64
import http.client
import json
import os
import stat
import subprocess
import threading
import time

import pytest
from conftest import config_refused, filter_yaml, listener_yaml, start_listener


def _proxy(start_proxy, tmp_path, upstream_address: str, tap_config: str, concurrency: int = 1):
    filters = filter_yaml("tap", tap_config)
    return start_listener(
        start_proxy, tmp_path, upstream_address, filters, top=f"concurrency: {concurrency}\n"
    )


def _request(port: int, method: str, target: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _records(path, count: int, timeout: float = 5.0) -> list[dict]:
    """Wait (bounded) until the sink holds `count` whole lines; parse them all."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [line for line in text.split("\n") if line]
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def _headers(record_side: dict) -> dict:
    return {name: value for name, value in record_side["headers"]}


def test_records_request_and_response_text_bodies(start_proxy, tmp_path, upstream):
    sink = tmp_path / "tap.jsonl"
    proxy, port = _proxy(start_proxy, tmp_path, upstream.address, f"{{path: {sink}}}")
    payload = json.dumps({"hello": "wörld", "n": 1}).encode()
    before = time.time()
    status, body = _request(
        port, "POST", "/echo?q=1", payload, {"content-type": "application/json", "x-trace": "t1"}
    )
    assert status == 200
    [record] = _records(sink, 1)
    assert stat.S_IMODE(os.stat(sink).st_mode) == 0o600
    request, response = record["request"], record["response"]
    head = _headers(request)
    assert head[":method"] == "POST" and head[":path"] == "/echo?q=1"
    assert head["x-trace"] == "t1" and head["content-type"] == "application/json"
    assert request["encoding"] == "utf8" and request["body"].encode() == payload
    assert request["bytes"] == len(payload) and request["truncated"] is False
    assert record["status"] == 200 and _headers(response)[":status"] == "200"
    assert response["encoding"] == "utf8" and response["body"].encode() == body
    assert json.loads(response["body"])["body_length"] == len(payload)
    assert before - 1 <= record["start"] <= record["end"] <= time.time() + 1
    assert record["duration_ms"] > 0 and record["listener"] == "main"
    assert proxy.listener()["filters"]["tap"]["tapped"] == 1


def test_binary_bodies_base64_and_truncation(start_proxy, tmp_path, upstream):
    sink = tmp_path / "tap.jsonl"
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, f"{{path: {sink}, max_body_bytes: 100}}"
    )
    binary = bytes(range(256))
    _request(port, "POST", "/echo", binary, {"content-type": "application/octet-stream"})
    _request(port, "POST", "/echo", b"\xff\xfe not utf-8", {"content-type": "text/plain"})
    _request(port, "PUT", "/echo", "é".encode() * 60, {"content-type": "text/plain"})
    first, second, third = _records(sink, 3)
    assert first["request"]["encoding"] == "base64"
    assert base64.b64decode(first["request"]["body"]) == binary[:100]
    assert first["request"]["bytes"] == 256 and first["request"]["truncated"] is True
    assert second["request"]["encoding"] == "base64"
    assert base64.b64decode(second["request"]["body"]) == b"\xff\xfe not utf-8"
    # 120 bytes of two-byte characters cut at 100: still text, the split character dropped.
    assert third["request"]["encoding"] == "utf8" and third["request"]["body"] == "é" * 50
    assert third["request"]["truncated"] is True


def test_matchers_select(start_proxy, tmp_path, upstream):
    sink = tmp_path / "tap.jsonl"
    match = (
        "{method: [POST, PUT], path_prefix: /api, headers: [{name: X-Debug, exact: '1'},"
        " {name: x-tenant, prefix: acme}, {name: x-skip, present: false}]}"
    )
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, f"{{path: {sink}, match: {match}}}"
    )
    good = {"x-debug": "1", "x-tenant": "acme-eu"}
    cases = [
        ("POST", "/api/a", good, True),
        ("PUT", "/api/b", good, True),
        ("GET", "/api/c", good, False),  # method
        ("POST", "/other", good, False),  # path prefix
        ("POST", "/api/d", {"x-debug": "2", "x-tenant": "acme"}, False),  # exact
        ("POST", "/api/e", {"x-debug": "1", "x-tenant": "other"}, False),  # prefix
        ("POST", "/api/f", {"x-debug": "1"}, False),  # prefix header absent
        ("POST", "/api/g", {**good, "x-skip": "y"}, False),  # present: false
    ]
    for method, path, headers, _ in cases:
        assert _request(port, method, path, b"x", headers)[0] == 200
    expected = [path for _, path, _, tapped in cases if tapped]
    records = _records(sink, len(expected))
    time.sleep(0.2)  # anything wrongly tapped would have been written by now, too
    records = _records(sink, len(expected))
    assert [_headers(r["request"])[":path"] for r in records] == expected
    snap = proxy.listener()
    assert snap["filters"]["tap"]["tapped"] == 2
    # Unmatched requests still pass the hook, so every request is timed in the stage.
    assert snap["stages"]["filter:tap"]["events"] >= len(cases)


@pytest.mark.parametrize("drain", ["loop", "thread"])
def test_full_queue_drops_and_counts(start_proxy, tmp_path, upstream, drain):
    sink = tmp_path / "tap.jsonl"
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, f"{{path: {sink}, queue_size: 1, drain: {drain}}}"
    )
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", "64", "-d", "1s", f"http://127.0.0.1:{port}/x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    snap = proxy.wait_for(
        lambda s: s["requests"] == s["filters"]["tap"]["tapped"] + s["filters"]["tap"]["dropped"]
    )
    counters = snap["filters"]["tap"]
    assert counters["dropped"] > 0, counters
    assert counters["tapped"] > 0
    assert counters["tapped"] + counters["dropped"] == snap["requests"]
    lines = _records(sink, counters["tapped"])
    assert len(lines) == counters["tapped"]  # every counted record is a whole, parseable line


def _stream(admin: str, query: str, into: list, timeout: float = 10) -> threading.Thread:
    def run() -> None:
        out = subprocess.run(
            ["curl", "-sS", "-N", "-D", "-", "--max-time", str(timeout), f"{admin}/tap?{query}"],
            capture_output=True,
            timeout=timeout + 5,
        )
        into.append(out)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("concurrency", [1, 2])
def test_admin_streams_records(start_proxy, tmp_path, upstream, concurrency):
    sink = tmp_path / "tap.jsonl"
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, f"{{path: {sink}}}", concurrency=concurrency
    )
    _request(
        port, "GET", "/before"
    )  # already in the file: not streamed (the stream starts at the end)
    _records(sink, 1)
    results: list = []
    thread = _stream(proxy.admin, "listener=main&limit=20", results)
    time.sleep(0.5)  # let the stream take its starting offset
    for i in range(20):
        _request(port, "POST", f"/s/{i}", f"body-{i}".encode())
    thread.join(15)
    [out] = results
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"transfer-encoding: chunked" in head.lower()
    records = [json.loads(line) for line in body.decode().splitlines() if line.startswith("{")]
    assert sorted(_headers(r["request"])[":path"] for r in records) == sorted(
        f"/s/{i}" for i in range(20)
    )
    assert {r["request"]["body"] for r in records} == {f"body-{i}" for i in range(20)}
    if concurrency == 2:
        assert len({r["worker"] for r in records}) == 2  # both workers' records reach the admin


def test_admin_stream_errors(start_proxy, tmp_path, upstream):
    sink = tmp_path / "tap.jsonl"
    proxy, port = _proxy(start_proxy, tmp_path, upstream.address, f"{{path: {sink}}}")
    for query, expect in [("listener=nope", b"no listener"), ("listener=main&limit=x", b"numbers")]:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "-w", "%{http_code}", f"{proxy.admin}/tap?{query}"],
            capture_output=True,
            timeout=10,
        )
        assert expect in out.stdout, out
    # A timeout ends an idle stream cleanly with the last chunk.
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"{proxy.admin}/tap?listener=main&timeout=0.3"],
        capture_output=True,
        timeout=10,
    )
    assert out.returncode == 0 and out.stdout == b"", out
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "config, field",
    [
        ("{max_body_bytes: 10}", "path"),
        ("{path: /nonexistent-dir/tap.jsonl}", "path"),
        (
            "{path: /tmp/t.jsonl, match: {headers: [{name: a, exact: b, prefix: c}]}}",
            "match.headers[0]",
        ),
        ("{path: /tmp/t.jsonl, match: {path_prefix: api}}", "match.path_prefix"),
        ("{path: /tmp/t.jsonl, queue_size: 0}", "queue_size"),
        ("{path: /tmp/t.jsonl, drain: later}", "drain"),
        ("{path: /tmp/t.jsonl, sink: file}", "sink"),
    ],
)
def test_bad_config_refused_with_field(tmp_path, config, field):
    out = config_refused(tmp_path, listener_yaml(1, "127.0.0.1:2", filter_yaml("tap", config)))
    assert f"listeners[0].filters[0].config.{field}:" in out.stderr, out.stderr
