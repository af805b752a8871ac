"""The native HTTP/2 lane (pyproxy/http/h2_lane.py) through a real pyproxy process.

The lane borrows its upstream connections from the pool once the general path made them, so
each connection warms up with a few requests before the ones a test is about. Every outcome
is held against the same proxy with the lane off (`http2_lane: false`): the lane must change
nothing a client or the app can see, only who does the work (`native_requests`).
"""

from __future__ import annotations

import gc
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import listener_block, refused, require_capability, start_listener
from h2_peer import H2Client
from test_express import RawUpstream

from pyproxy.codec import http2_native

pytestmark = pytest.mark.skipif(
    not http2_native.AVAILABLE, reason="the native HTTP/2 codec (libnghttp2-dev) is not built"
)


def _proxy(start_proxy, tmp_path, upstream: str, lane: bool, http: str = "", top: str = ""):
    body = f"    http:\n      http2_lane: {'true' if lane else 'false'}\n{http}"
    return start_listener(start_proxy, tmp_path, upstream, body, top=top)


def _warm(client: H2Client, rounds: int = 3) -> None:
    """A few rounds of two concurrent GETs: the pool gets connections the lane then borrows."""
    for i in range(rounds):
        sids = [client.request(f"/warm{i}-{j}", flush=False) for j in range(2)]
        client.flush()
        assert [r["status"] for r in client.wait(sids)] == [200, 200]


def _outcome(response: dict) -> tuple:
    headers = sorted((n, v) for n, v in response["headers"] or [] if n != b"date")
    return response["status"], headers, bytes(response["body"]), response["reset"]


def test_plain_gets_are_carried_in_c_with_the_general_paths_accounts(start_proxy, tmp_path):
    require_capability("h2load (nghttp2-client)", shutil.which("h2load") is not None)
    upstream = RawUpstream()
    proxy, port = _proxy(start_proxy, tmp_path, upstream.address, lane=True)
    result = subprocess.run(
        ["h2load", "-n", "3000", "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/h"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "3000 succeeded" in result.stdout and "3000 2xx" in result.stdout, result.stdout
    stats = proxy.wait_for(lambda s: s["duration"]["count"] == 3000)
    assert stats["requests"] == 3000 and stats["responses"]["2xx"] == 3000
    assert stats["native_requests"] > 2000, stats  # all but the warm-up went through C
    assert stats["express_requests"] == stats["native_requests"]
    assert stats["flags"] == {} and stats["rejected"] == {}
    # The lane's reads, writes and parses are on the stage clock.
    assert stats["stages"]["parse"]["events"] > 2 * stats["native_requests"]
    assert stats["bytes"]["upstream_tx"] == sum(len(r) for r in upstream.requests)


def test_the_app_and_the_client_see_what_the_general_path_gives(start_proxy, tmp_path):
    seen = {}
    for lane in (False, True):
        upstream = RawUpstream()
        proxy, port = _proxy(start_proxy, tmp_path, upstream.address, lane)
        client = H2Client(port)
        _warm(client)
        before = proxy.listener()["native_requests"]
        fields = [("accept", "*/*"), ("te", "trailers"), ("x-b", "two  spaces"), ("trailer", "x")]
        answers = [_outcome(r) for r in client.wait([client.request("/same?q=1", headers=fields)])]
        answers += [_outcome(r) for r in client.wait([client.request("/204")])]
        seen[lane] = (answers, upstream.requests[-2:])
        carried = proxy.listener()["native_requests"] - before
        assert carried == (2 if lane else 0)
        client.close()
        proxy.signal(signal.SIGTERM)
        proxy.proc.wait(10)
    assert seen[True] == seen[False]


def test_head_requests_are_carried_and_answered_without_a_body(start_proxy, tmp_path, upstream):
    seen = {}
    for lane in (False, True):
        proxy, port = _proxy(start_proxy, tmp_path, upstream.address, lane)
        client = H2Client(port)
        _warm(client)
        before = proxy.listener()["native_requests"]
        answers = [
            _outcome(client.wait([client.request(path, "HEAD")])[0]) for path in ("/h", "/big?mb=1")
        ]
        answers.append(_outcome(client.wait([client.request("/after")])[0]))
        # The app closes after a HEAD of /big (its h11 refuses the body): /after may start over.
        carried = proxy.listener()["native_requests"] - before
        assert carried >= 2 if lane else carried == 0
        seen[lane] = answers
        client.close()
    assert seen[True] == seen[False]
    assert seen[True][1][2] == b"" and (b"content-length", b"1048576") in seen[True][1][1]


SPECIAL = ["/pieces", "/chunked", "/close", "/vanish", "/both-framings", "/echo", "/cut", "/204"]


def test_answers_the_lane_cannot_carry_are_handed_to_the_general_path(start_proxy, tmp_path):
    seen = {}
    for lane in (False, True):
        upstream = RawUpstream()
        proxy, port = _proxy(start_proxy, tmp_path, upstream.address, lane)
        client = H2Client(port)
        answers = []
        for path in SPECIAL:
            _warm(client, 2)  # the lane has idle connections again (a handover may close one)
            answers.append(_outcome(client.wait([client.request(path)])[0]))
        # The session carries on: a plain request after them all.
        answers.append(_outcome(client.wait([client.request("/after")])[0]))
        stats = proxy.wait_for(lambda s: s["duration"]["count"] == s["requests"])
        seen[lane] = (answers, stats["requests"], stats["responses"], stats["flags"])
        assert stats["native_requests"] > 0 if lane else stats["native_requests"] == 0
        assert "Traceback" not in proxy.output, proxy.output
        client.close()
    assert seen[True] == seen[False]


# Request heads the general path refuses or answers itself: the lane must not take them.
MALFORMED = {
    "path-not-origin-form": [(b":path", b"nope")],
    "path-with-space": [(b":path", b"/a b")],
    "authority-userinfo": [(b":authority", b"u@host")],
    "scheme-ftp": [(b":scheme", b"ftp")],
    "connect": [(b":method", b"CONNECT")],
    "get-promising-a-body": [(b"content-length", b"5")],
    "too-many-fields": [(b"x-f%d" % i, b"v") for i in range(120)],
    "upper-case-name": [(b"X-Up", b"v")],
}


def _malformed_request(client: H2Client, change: list) -> int:
    head = {b":method": b"GET", b":scheme": b"http", b":authority": b"svc", b":path": b"/m"}
    extra = []
    for name, value in change:
        if name in head:
            head[name] = value
        else:
            extra.append((name, value))
    conn = client.conn
    conn.config.validate_outbound_headers = False
    conn.config.normalize_outbound_headers = False
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, list(head.items()) + extra, end_stream=True)
    client.responses[sid] = {"status": None, "headers": None, "body": bytearray(),
                             "trailers": None, "done": False, "reset": None}  # fmt: skip
    client.flush()
    return sid


def test_malformed_requests_get_the_general_paths_answers(start_proxy, tmp_path):
    seen = {}
    for lane in (False, True):
        upstream = RawUpstream()
        proxy, port = _proxy(start_proxy, tmp_path, upstream.address, lane)
        answers = {}
        for name, change in MALFORMED.items():
            client = H2Client(port)  # some answers end the connection
            _warm(client, 2)
            (response,) = client.wait([_malformed_request(client, change)])
            answers[name] = (_outcome(response), client.terminated is not None)
            if client.terminated is None:
                answers[name + ", then"] = _outcome(client.wait([client.request("/fine")])[0])
            client.close()
        stats = proxy.listener()
        seen[lane] = (answers, stats["rejected"], stats["flags"], len(upstream.requests))
    assert seen[True] == seen[False]
    assert seen[True][0]["path-not-origin-form, then"][0] == 200


def test_the_route_timeout_and_a_client_reset_hold_in_the_lane(start_proxy, tmp_path):
    upstream = RawUpstream()
    routes = "    routes:\n      - match: {prefix: /}\n        timeout: 300ms\n"
    proxy, port = start_listener(
        start_proxy, tmp_path, upstream.address, "    http:\n      http2_lane: true\n" + routes
    )
    client = H2Client(port)
    _warm(client)
    (late,) = client.wait([client.request("/slow")])  # the app answers after 800 ms
    assert late["status"] == 504
    stats = proxy.wait_for(lambda s: s["flags"].get("UT") == 1)
    assert stats["flags"] == {"UT": 1}
    # A stream the client resets while the lane carries it: nothing breaks, the next is served.
    _warm(client, 2)
    sid = client.request("/slow")
    client.conn.reset_stream(sid, 0x8)
    client.flush()
    time.sleep(1)
    (after,) = client.wait([client.request("/after")])
    assert after["status"] == 200 and bytes(after["body"]) == b"ok:/after"
    assert "Traceback" not in proxy.output, proxy.output


@pytest.mark.parametrize("lane_on", [False, True])
def test_a_drain_lets_the_lanes_streams_finish(start_proxy, tmp_path, lane_on):
    upstream = RawUpstream()
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, lane=lane_on, top="drain_timeout: 5s\n"
    )
    client = H2Client(port)
    _warm(client)
    before = proxy.listener()["native_requests"]
    sid = client.request("/slow")
    time.sleep(0.2)
    proxy.signal(signal.SIGTERM)
    frames = _frames_until_end(client, sid)
    assert frames[0][0] == 0x7  # GOAWAY first: the client goes elsewhere for new requests
    status = dict(client.conn.decoder.decode(frames[1][2], raw=True))[b":status"]
    assert status == b"200" and frames[2] == (0x0, 0x1, b"slow")
    assert proxy.proc.wait(10) == 0
    assert before > 0 if lane_on else before == 0


def _frames_until_end(client: H2Client, sid: int) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of the frames read until ``sid`` ends, read past h2's state
    machine (which closes at a GOAWAY); header blocks stay decodable with its HPACK decoder."""
    frames, buf = [], b""
    client.sock.settimeout(5)
    while True:
        data = client.sock.recv(65536)
        assert data, frames
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, flags, buf[9 : 9 + length]))
            buf = buf[9 + length :]
            if stream == sid and kind in (0x0, 0x1) and flags & 0x1:
                return [f for f in frames if f[0] in (0x0, 0x1, 0x7)]


def test_the_switch_is_validated(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listeners:\n  - name: main\n    mode: http\n    address: 127.0.0.1:1\n"
        "    upstream: 127.0.0.1:2\n    http:\n      http2_lane: sometimes\n"
    )
    result = refused("-c", str(path))
    assert "http2_lane" in result.stderr and "expected true or false" in result.stderr


GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/x")]


SENT = b"GET /x HTTP/1.1\r\nhost: svc\r\n\r\n"


def test_every_lane_is_freed_with_its_session_after_10000_connections():
    lib, ffi = http2_native.lib, http2_native.ffi
    sessions, lanes = lib.pp_h2_live(), lib.pp_lane_live()
    block = listener_block()
    pointer = ffi.cast("int64_t *", ffi.from_buffer(block))
    slots = ffi.new("int32_t[]", [0] * lib.PP_LANE_N_SLOTS)
    limits = ffi.new("uint32_t[]", [100, 100, 65536])
    client = http2_native.NativeH2Connection(client_side=True, reset_burst=1000)
    client.initiate({}, 65535)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, GET, end_stream=True)
    request = client.data_to_send()
    del client
    app, proxy_side = socket.socketpair()
    proxy_side.setblocking(False)
    for _ in range(10_000):
        conn = http2_native.NativeH2Connection(client_side=False, reset_burst=1000)
        lane = lib.pp_lane_attach(conn.session, pointer, slots, 0, limits)
        assert lib.pp_lane_add_upstream(lane, proxy_side.fileno()) == 0
        events = conn.receive_data(request)  # the client's SETTINGS only: the lane took the GET
        assert [type(e).__name__ for e in events] == ["RemoteSettingsChanged"]
        assert lib.pp_lane_send(lane) == 0
        assert app.recv(4096) == SENT
        del conn  # the stream is still in flight: the lane goes with its session
    gc.collect()
    assert lib.pp_h2_live() == sessions and lib.pp_lane_live() == lanes
    # Every slot index is 0 here: each lane counted a request and the bytes it sent.
    assert block[0] == 10_000 * (1 + len(SENT))
    app.close()
    proxy_side.close()


GRPC = [
    (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/p.S/M"),
    (b"content-type", b"application/grpc"), (b"te", b"trailers"),
]  # fmt: skip


def _grpc_lane_inputs():
    """What pp_glane_attach takes here: a listener block (kept alive by the caller) and its
    pointer, the slot indexes (all 0), the limits; and a client whose preface is queued."""
    lib, ffi = http2_native.lib, http2_native.ffi
    block = listener_block()
    pointer = ffi.cast("int64_t *", ffi.from_buffer(block))
    slots = ffi.new("int32_t[]", [0] * lib.PP_GLANE_N_SLOTS)
    limits = ffi.new("uint32_t[]", [100, 100, 65536, 1 << 20, 1 << 20])
    client = http2_native.NativeH2Connection(client_side=True, reset_burst=1000)
    client.initiate({}, 65535)
    return block, pointer, slots, limits, client


def test_every_grpc_lane_is_freed_with_either_session_first_after_10000_connections():
    """The gRPC lane links two sessions: whichever is freed first, nothing in C points at it,
    and the lane goes with its downstream session."""
    lib = http2_native.lib
    sessions, lanes = lib.pp_h2_live(), lib.pp_glane_live()
    block, pointer, slots, limits, client = _grpc_lane_inputs()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, GRPC)
    client.send_data(sid, b"\0\0\0\0\x03abc", end_stream=True)
    request = client.data_to_send()
    del client
    for i in range(10_000):
        down = http2_native.NativeH2Connection(client_side=False, reset_burst=1000)
        up = http2_native.NativeH2Connection(client_side=True, reset_burst=1000)
        lane = lib.pp_glane_attach(down.session, pointer, slots, limits, 0)
        lib.pp_glane_set_upstream(lane, up.session)
        events = down.receive_data(request)  # the client's SETTINGS only: the lane took the call
        assert [type(e).__name__ for e in events] == ["RemoteSettingsChanged"]
        assert b"abc" in up.data_to_send()  # on its way upstream, in flight
        if i % 2:  # each goes at once (no cycle holds a session): the order is as written
            del up
            del down
        else:
            del down
            del up
    gc.collect()
    assert lib.pp_h2_live() == sessions and lib.pp_glane_live() == lanes
    assert block[0] == 10_000 * 2  # every slot index is 0: each call counted as read and taken


def test_a_read_the_grpc_lane_takes_whole_costs_one_crossing_and_leaves_nothing_for_python():
    """pp_glane_recv: a read that holds a whole call and nothing else for Python returns 0 with
    the call's upstream bytes in hand (up_dirty reset: no flush is owed); a read with a record
    Python must see (the client's first SETTINGS) returns 1 and goes on as pp_h2_recv's."""
    lib, ffi = http2_native.lib, http2_native.ffi
    block, pointer, slots, limits, client = _grpc_lane_inputs()
    down = http2_native.NativeH2Connection(client_side=False, reset_burst=1000)
    up = http2_native.NativeH2Connection(client_side=True, reset_burst=1000)
    lane = lib.pp_glane_attach(down.session, pointer, slots, limits, 0)
    lib.pp_glane_set_upstream(lane, up.session)
    state = lib.pp_glane_state_of(lane)
    io = ffi.new("pp_glane_io *")

    def read(data: bytes) -> int:
        return lib.pp_glane_recv(
            lane, down.session, data, len(data), down._out, down._events, down._pending, io
        )

    def call(body: bytes) -> bytes:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, GRPC)
        client.send_data(sid, b"\0\0\0\0" + bytes([len(body)]) + body, end_stream=True)
        return client.data_to_send()

    assert read(call(b"one")) == 1  # the preface's SETTINGS: Python's
    assert [type(e).__name__ for e in down.received(io.n)] == ["RemoteSettingsChanged"]
    assert state.up_dirty and b"one" in up.data_to_send()
    state.up_dirty = 0
    assert read(call(b"two")) == 0
    assert not state.up_dirty and io.other_len
    assert b"two" in ffi.buffer(io.other_out, io.other_len)[:]
    assert up.data_to_send() == b""  # nothing left behind: nothing is sent twice
    assert state.in_flight == 2
