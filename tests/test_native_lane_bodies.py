"""Routes whose filters look at bodies, through a real pyproxy: the native pair runs the body
filters over each whole body in the same call as its head (native_lane.py) and goes on as read
when they let it through unchanged; whatever else they do is handed to the general path, which
carries the message on from there without feeding them the body again.

Each script runs on one connection paired (`express_lane: native`) and on the general path
(`off`): the client and the app must see the same messages (the general path writes the field
names of a head its response filters saw in lower case, the pair forwards a head they did not
change as read), the listener the same counters.
"""

from __future__ import annotations

import json

import pytest
from http_peer import HttpUpstream
from test_express import Client
from test_native_lane import CATCH_ALL, _both_lanes, lane_listener
from wasm_sdk import assemblyscript_module

pytest.importorskip("wasmtime")


def _wasm(name: str, module: str, root_id: str, configuration: str = "enabled") -> str:
    code = f"{{code: {{local: {{filename: {assemblyscript_module(module)}}}}}}}"
    return (
        f"      - name: {name}\n        type: wasm\n        config:\n"
        f"          root_id: {root_id}\n          vm_config: {code}\n"
        f"          configuration: {configuration}\n"
    )


def _lanes(start_proxy, tmp_path, filters: str, script, routes: str = ""):
    """_both_lanes with heads compared case-insensitively: the native run's (replies, sent, stats)."""
    return _both_lanes(start_proxy, tmp_path, filters, script, routes, fold_case=True)["native"]


def _post(client: Client, path: bytes, body: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    client.send(
        b"POST %s HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path, len(body), extra, body)
    )
    return client.response()


def test_an_sdk_module_with_body_callbacks_rides_the_pair(start_proxy, tmp_path):
    """The AssemblyScript SDK exports every body callback; its headers example returns
    Continue from them: after the first exchange, every one is carried in C."""

    def script(client):
        replies = [client.get(b"/g%d" % i) for i in range(4)]
        replies += [_post(client, b"/echo", b"body %d" % i) for i in range(2)]
        replies.append(client.get(b"/204"))
        return replies

    filters = _wasm("sdk", "headers", "add_header", "from-config")
    replies, sent, stats = _lanes(start_proxy, tmp_path, filters, script)
    assert all(b"hello: from-config" in head for head, _ in replies)
    assert [body for _, body in replies[4:6]] == [b"body 0", b"body 1"]
    assert all(b"x-as-request: seen" in request for request in sent)
    assert stats["native_requests"] == 6, stats  # all but the first, which paired the two


BODY_CASES = _wasm("cases", "body_cases", "body_cases")


def test_a_body_the_filters_let_through_as_it_came_goes_on_in_c(start_proxy, tmp_path):
    def script(client):
        return [_post(client, b"/echo", b"plain %d" % i) for i in range(3)]

    replies, sent, stats = _lanes(start_proxy, tmp_path, BODY_CASES, script)
    assert [body for _, body in replies] == [b"plain 0", b"plain 1", b"plain 2"]
    assert stats["native_requests"] == 2, stats


def test_changed_bodies_are_taken_and_sent_as_the_filters_left_them(start_proxy, tmp_path):
    """A body changed (same length: the head still frames it) goes on through the general
    path, once: the request's upper-cased body reaches the app, the response's the client."""
    shout = b"X-Body-Case: shout\r\n"

    def script(client):
        return [
            _post(client, b"/echo", b"warm"),
            _post(client, b"/echo", b"quiet words", shout),
            client.get(b"/quiet", shout),
            _post(client, b"/echo", b"after"),
            client.get(b"/after"),
        ]

    replies, sent, stats = _lanes(start_proxy, tmp_path, BODY_CASES, script)
    assert sent[1].endswith(b"\r\n\r\nQUIET WORDS")  # the app got it once, changed
    assert replies[1][1] == b"QUIET WORDS"  # and the response was shouted on the way back too
    assert replies[2][1] == b"OK:/QUIET"
    assert replies[3][1] == b"after" and replies[4][1] == b"ok:/after"
    assert stats["native_requests"] == 2, stats  # the last two: the connection paired again


def test_a_head_the_pair_cannot_write_after_the_body_went_through_is_sent_once(
    start_proxy, tmp_path
):
    """The SDK's body example drops content-length from both heads (the pair cannot write
    such a head: it would not frame the body as read) and rewrites both bodies: each message
    is taken after its body went through the filters, and goes on as they left it, once."""
    filters = _wasm("body", "body", "body")
    runs = {}
    for lane in ("native", "off"):
        app = HttpUpstream()
        try:
            _, proxy, client = lane_listener(start_proxy, tmp_path, lane, filters, upstream=app)
            replies = [_post(client, b"/echo", b) for b in (b"warm", b"a secret word", b"plain")]
            stats = proxy.wait_for(lambda s: s["requests"] == 3)
            client.close()
        finally:
            app.close()
        bodies = []
        for head, body in replies:
            assert b"transfer-encoding: chunked" in head.lower()  # the module dropped the length
            text = h11_dechunk(body)
            echo, _, tail = text.partition(b"\n-- seen by as-sdk\n")
            assert tail == b""  # the line appended once
            seen = json.loads(echo)
            bodies.append((seen["body_length"], seen["body_sha256"]))
        runs[lane] = (bodies, stats["native_requests"])
    assert runs["native"][0] == runs["off"][0]
    assert runs["native"][0][1][0] == len(b"a [redacted] word")
    assert runs["native"][1] == 0  # each message taken, none carried in C


def h11_dechunk(body: bytes) -> bytes:
    """A chunked body's data."""
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            return out
        out += rest[:length]
        body = rest[length + 2 :]


def test_a_filter_answering_from_the_request_body_is_taken_before_the_app(start_proxy, tmp_path):
    def script(client):
        return [
            _post(client, b"/echo", b"warm"),
            _post(client, b"/echo", b"ask", b"X-Body-Case: reply\r\n"),
            _post(client, b"/echo", b"after"),
        ]

    replies, sent, stats = _lanes(start_proxy, tmp_path, BODY_CASES, script)
    assert (
        replies[1][0].startswith(b"http/1.1 418") and replies[1][1] == b"answered from the body\n"
    )
    assert len(sent) == 2 and stats["flags"] == {"LR": 1}, stats
    assert replies[2][1] == b"after"


def test_a_filter_answering_from_the_response_body_resets_as_on_the_general_path(
    start_proxy, tmp_path
):
    """The head had passed the filters: as on the general path, an answer from the body
    callback comes too late to replace the response, and the downstream is reset."""
    outcomes = {}
    for lane in ("native", "off"):
        _, proxy, client = lane_listener(start_proxy, tmp_path, lane, BODY_CASES)
        assert client.get(b"/warm")[1] == b"ok:/warm"
        client.send(b"GET /late HTTP/1.1\r\nHost: svc\r\nX-Body-Case: reply\r\n\r\n")
        received = read_to_the_end(client)
        stats = proxy.wait_for(lambda s: s["requests"] == 2)
        outcomes[lane] = (b"418" in received, stats["flags"], stats["responses"])
        client.close()
    assert outcomes["native"] == outcomes["off"]
    assert outcomes["native"][0] is False


def read_to_the_end(client: Client) -> bytes:
    """What the proxy sends until it closes or resets the connection."""
    received = b""
    try:
        while chunk := client.sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_a_held_body_waits_for_the_route_timeout_on_the_general_path(start_proxy, tmp_path):
    def script(client):
        return [
            _post(client, b"/echo", b"warm"),
            _post(client, b"/echo", b"held", b"X-Body-Case: hold\r\n"),
        ]

    replies, sent, stats = _lanes(start_proxy, tmp_path, BODY_CASES, script, CATCH_ALL % "300ms")
    assert replies[1][0].startswith(b"http/1.1 504")
    assert len(sent) == 1 and stats["flags"] == {"UT": 1}, stats


def test_tap_on_the_pair_records_every_body(start_proxy, tmp_path):
    """Tap has body hooks: paired, its records still hold each request's and response's body."""
    records = {}
    for lane in ("native", "off"):
        sink = tmp_path / f"tap-{lane}.jsonl"
        filters = f"      - name: tap\n        type: tap\n        config: {{path: {sink}}}\n"
        _, proxy, client = lane_listener(start_proxy, tmp_path, lane, filters)
        replies = [_post(client, b"/echo", b"tapped %d" % i) for i in range(3)]
        replies.append(client.get(b"/plain"))
        assert [b for _, b in replies] == [b"tapped 0", b"tapped 1", b"tapped 2", b"ok:/plain"]
        stats = proxy.wait_for(lambda s: s["filters"]["tap"]["tapped"] == 4)
        client.close()
        found = []
        for line in sink.read_text().splitlines():
            record = json.loads(line)
            request, response = record["request"], record["response"]
            found.append((request.get("body"), request["bytes"], response.get("body")))
        records[lane] = (found, stats["native_requests"])
    assert records["native"][0] == records["off"][0]
    assert len(records["native"][0]) == 4 and records["native"][0][1][1] == len(b"tapped 1")
    assert records["native"][1] == 3 and records["off"][1] == 0
