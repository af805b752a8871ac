"""The native gRPC lane (pyproxy/http/grpc_lane.py, native/grpc_lane.c) through a real pyproxy
process, with real grpcio clients and servers: every test runs with the lane on and off
(`grpc_lane`), and the lane-on runs check the listener's native-request counter, so they
cannot pass on the general path by accident."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest
from conftest import ProxyProcess, free_port
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived, StreamEnded, StreamReset
from h2.settings import SettingCodes
from h2_peer import H2Client
from test_grpc_proxy import (  # noqa: F401  (pb: a fixture)
    GRPC_OPTIONS,
    Upstream,
    _stub,
    _wait_trailers_only,
    pb,
)
from test_grpc_proxy import _raw_call as _h2_call

from pyproxy.codec.grpc import frame

LIMIT = 1024 * 1024
SLOW = b"/pkg.Svc/Slow"
SILENT = b"/pkg.Svc/Silent"
BATCH = 140  # answers in one upstream write: more than one read's worth of finished calls in C


@pytest.fixture(scope="module")
def upstream(pb):  # noqa: F811
    server = Upstream(pb)
    yield server
    server.close()


@pytest.fixture(scope="module", params=["lane-on", "lane-off"])
def lane(request) -> bool:
    from pyproxy.codec import http2_native

    if not http2_native.AVAILABLE:
        pytest.fail("the native HTTP/2 codec is not built")
    return request.param == "lane-on"


def _start(path, lane: bool, upstream_port: int, ports: dict, routes: dict | None = None):
    """pyproxy with one gRPC listener per port name to the upstream, the lane on or off
    (JSON is YAML); ``routes``: a listener's own routes, by name."""
    listeners = [
        {
            "name": name,
            "mode": "grpc",
            "address": f"127.0.0.1:{port}",
            "upstream": f"127.0.0.1:{upstream_port}",
            "http": {"max_concurrent_streams": 300, "grpc_lane": lane},
            "grpc": {"max_request_message_bytes": LIMIT, "max_response_message_bytes": LIMIT},
        }
        | ({"routes": routes[name]} if routes and name in routes else {})
        for name, port in ports.items()
    ]
    path.write_text(json.dumps({"listeners": listeners}))
    process = ProxyProcess(["-c", str(path)]).wait_ready()
    process.ports = ports
    process.lane = lane
    return process


@pytest.fixture(scope="module")
def proxy(upstream, lane, tmp_path_factory):
    config = tmp_path_factory.mktemp("lane") / "proxy.yaml"
    ports = {name: free_port() for name in ("main", "timed")}
    timed = [{"match": {"prefix": "/"}, "timeout": "600ms"}]
    process = _start(config, lane, upstream.port, ports, {"timed": timed})
    yield process
    process.stop()


@pytest.fixture
def echo(pb, proxy):  # noqa: F811
    channel, stub = _stub(pb, proxy.ports["main"])
    # A connection's first calls find no lane upstream yet (they take the general path while
    # it connects): every test counts from a call the lane carried.
    _until_carried(proxy, lambda: stub.Unary(pb[0].Msg(data=b"warm"), timeout=5))
    yield stub
    channel.close()


def _until_carried(proxy, call) -> None:
    """Make calls until one finishes in the lane (lane on; one call with it off)."""
    carried = Carried(proxy)
    for _ in range(100 if proxy.lane else 1):
        call()
        if carried.count():
            return
        time.sleep(0.02)
    assert not proxy.lane, "the lane carried no call"


class Carried:
    """How many calls the lane finished in C across a block: all of them with the lane on,
    none with it off."""

    def __init__(self, proxy, name: str = "main") -> None:
        self.proxy, self.name = proxy, name
        self.before = proxy.listener(name)["native_requests"]

    def count(self) -> int:
        return self.proxy.listener(self.name)["native_requests"] - self.before

    def expect(self, calls: int) -> None:
        want = calls if self.proxy.lane else 0
        snap = self.proxy.wait_for(lambda s: s["native_requests"] - self.before >= want, self.name)
        assert snap["native_requests"] - self.before == want


def test_unary_calls_arrive_byte_exact_and_the_lane_carries_them(pb, echo, proxy):  # noqa: F811
    carried = Carried(proxy)
    Msg = pb[0].Msg
    for size in (0, 1, 100, 16000):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert echo.Unary(Msg(data=data), timeout=5).data == data
    carried.expect(4)


def test_metadata_trailers_and_statuses_cross_unchanged(pb, echo, proxy, upstream):  # noqa: F811
    carried = Carried(proxy)
    reply, call = echo.Unary.with_call(
        pb[0].Msg(data=b"m"), metadata=[("x-meta", "v1"), ("x-bin-bin", b"\x01\x02")], timeout=5
    )
    assert reply.data == b"m"
    assert ("x-initial", "i1") in call.initial_metadata()
    trailing = dict(call.trailing_metadata())
    assert trailing["x-trailer"] == "t1" and trailing["x-bin-bin"] == b"\x00\xff"
    assert upstream.metadata[-1]["x-meta"] == "v1"
    assert upstream.metadata[-1]["x-bin-bin"] == b"\x01\x02"
    for code in (3, 5, 7, 13, 14):
        with pytest.raises(grpc.RpcError) as err:
            echo.Unary(pb[0].Msg(code=code, text=f"status {code} here"), timeout=5)
        assert err.value.code().value[0] == code
        assert err.value.details() == f"status {code} here"
    carried.expect(6)


def test_large_messages_are_declined_to_the_general_path(pb, echo, proxy):  # noqa: F811
    carried = Carried(proxy)
    data = b"L" * (200 * 1024)
    assert echo.Unary(pb[0].Msg(data=data), timeout=5).data == data
    # A small request whose answer is large: taken, then its response handed over.
    assert (
        len(echo.Unary(pb[0].Msg(data=b"s", reply_size=300 * 1024), timeout=5).data) == 300 * 1024
    )
    carried.expect(0)
    with pytest.raises(grpc.RpcError) as err:
        echo.Unary(pb[0].Msg(data=b"o" * (LIMIT + 10)), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_streaming_calls_are_carried_correctly(pb, echo, proxy):  # noqa: F811
    Msg = pb[0].Msg
    replies = list(echo.ServerStream(Msg(data=b"s", count=4), timeout=5))
    assert [r.data for r in replies] == [b"s"] * 4
    reply = echo.ClientStream(iter([Msg(data=b"ab"), Msg(data=b"cde")]), timeout=5)
    assert (reply.count, reply.data) == (2, b"5")
    out = list(echo.Bidi(iter([Msg(data=b"abc", count=1), Msg(data=b"xy", count=2)]), timeout=5))
    assert [(r.data, r.count) for r in out] == [(b"cba", 1), (b"yx", 2)]


def test_many_concurrent_calls_on_one_connection(pb, echo, proxy):  # noqa: F811
    carried = Carried(proxy)
    Msg = pb[0].Msg
    calls = [echo.Unary.future(Msg(data=b"%d" % i), timeout=10) for i in range(200)]
    assert [c.result().data for c in calls] == [b"%d" % i for i in range(200)]
    if proxy.lane:
        # Calls that found no upstream connection yet (the first read) go the general path.
        snap = proxy.wait_for(lambda s: s["native_requests"] - carried.before >= 150)
        assert snap["native_requests"] - carried.before >= 150
    else:
        carried.expect(0)


def test_route_timeout_ends_a_lane_call_as_the_general_path_does(pb, proxy):  # noqa: F811
    channel, stub = _stub(pb, proxy.ports["timed"])
    try:
        stub.Unary(pb[0].Msg(data=b"warm"), timeout=5)
        before = proxy.listener("timed")
        with pytest.raises(grpc.RpcError) as err:
            stub.Unary(pb[0].Msg(delay_ms=3000), timeout=10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        after = proxy.wait_for(
            lambda s: s["flags"].get("UT", 0) > before["flags"].get("UT", 0), "timed"
        )
        assert after["flags"].get("UT", 0) == before["flags"].get("UT", 0) + 1
    finally:
        channel.close()


def test_client_cancel_reaches_the_server(pb, echo, proxy, upstream):  # noqa: F811
    before = proxy.listener()
    while not upstream.cancelled.empty():
        upstream.cancelled.get_nowait()
    call = echo.Unary.future(pb[0].Msg(delay_ms=3000), timeout=10)
    time.sleep(0.3)
    call.cancel()
    upstream.cancelled.get(timeout=3)
    after = proxy.wait_for(lambda s: s["flags"].get("DR", 0) > before["flags"].get("DR", 0))
    assert after["flags"].get("DR", 0) == before["flags"].get("DR", 0) + 1
    statuses = after["grpc"]["methods"]["pyproxytest.Echo/Unary"]["statuses"]
    assert statuses.get("CANCELLED", 0) >= 1


def test_per_method_metrics_count_lane_calls(pb, echo, proxy):  # noqa: F811
    carried = Carried(proxy)
    name = "pyproxytest.Echo/Unary"
    before = proxy.listener()["grpc"]
    echo.Unary(pb[0].Msg(data=b"a"), timeout=5)
    with pytest.raises(grpc.RpcError):
        echo.Unary(pb[0].Msg(code=5, text="gone"), timeout=5)

    def done(snap):
        return snap["grpc"]["calls_finished"] >= before["calls_finished"] + 2

    after = proxy.wait_for(done)["grpc"]
    unary, old = after["methods"][name], before["methods"][name]
    assert after["calls_finished"] == before["calls_finished"] + 2
    assert unary["started"] == old["started"] + 2
    assert unary["statuses"]["OK"] == old["statuses"]["OK"] + 1
    assert unary["statuses"]["NOT_FOUND"] == old["statuses"].get("NOT_FOUND", 0) + 1
    assert after["messages"]["received"] - before["messages"]["received"] == 2
    assert after["messages"]["sent"] - before["messages"]["sent"] == 1
    # The warm call taught the connection's lane the method: C counted these two itself.
    assert after["duration"]["count"] == before["duration"]["count"] + 2
    assert after["duration"]["sum_seconds"] > before["duration"]["sum_seconds"]
    carried.expect(2)


def test_lane_reads_count_the_reads_taken_whole_in_c(pb, echo, proxy):  # noqa: F811
    carried = Carried(proxy)
    before = proxy.listener()["lane_reads"]
    for _ in range(20):
        echo.Unary(pb[0].Msg(data=b"a"), timeout=5)
    carried.expect(20)
    after = proxy.listener()["lane_reads"]
    reads, whole = (after[k] - before[k] for k in ("all", "whole"))
    if proxy.lane:
        # each call: at least its request's read and its answer's, most of them whole
        assert reads >= 40 and 0 < whole <= reads
    else:
        assert reads == whole == 0


class _RawUpstream:
    """An h2c server that records each request's header list and answers like a unary call;
    with `mode`: "reset" resets the stream, "drop" drops the connection, "odd" answers with a
    hop-by-hop `trailer` field, "long" with a Content-Length the body does not match, "batch"
    holds its answers until BATCH calls wait on one connection (or a second passed) and sends
    them all in one write. A call to SLOW gets its head at once and the rest a second later; a
    call to SILENT gets nothing (nor does this server end it at its grpc-timeout, as grpcio's
    would): the streams reset to it are in ``resets``."""

    def __init__(self, mode: str = "answer") -> None:
        self.mode = mode
        self.heads: list = []
        self.resets: list[int] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy went away first (a late SLOW answer to a call it ended): done

    def _converse(self, conn: socket.socket) -> None:
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.initiate_connection()
        h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        conn.sendall(h2.data_to_send())
        waiting: list[int] = []
        conn.settimeout(1.0 if self.mode == "batch" else None)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    data = None  # a batch's second passed: answer what waits
                if data == b"":
                    return
                for event in h2.receive_data(data) if data else ():
                    if isinstance(event, RequestReceived):
                        self.heads.append(list(event.headers))
                    elif isinstance(event, StreamReset):
                        self.resets.append(event.stream_id)
                    elif isinstance(event, StreamEnded):
                        if self._answer(conn, h2, event.stream_id, waiting) == "drop":
                            return
                if waiting and (data is None or len(waiting) >= BATCH):
                    for sid in waiting:
                        self._unary(h2, sid, [])
                    waiting.clear()
                conn.sendall(h2.data_to_send())

    def _answer(self, conn: socket.socket, h2: H2Connection, sid: int, waiting: list) -> str:
        if (b":path", SILENT) in self.heads[-1]:
            pass
        elif (b":path", SLOW) in self.heads[-1]:
            h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            conn.sendall(h2.data_to_send())
            time.sleep(1.0)
            self._unary(h2, sid, [], head=False)
        elif self.mode == "reset":
            h2.reset_stream(sid, 2)
        elif self.mode == "drop":
            conn.shutdown(socket.SHUT_RDWR)
            return "drop"
        elif self.mode == "batch":
            waiting.append(sid)
        elif self.mode == "odd":
            self._unary(h2, sid, [(b"trailer", b"grpc-status")])
        elif self.mode == "long":
            self._unary(h2, sid, [(b"content-length", b"99")])
        else:
            self._unary(h2, sid, [])
        return ""

    @staticmethod
    def _unary(h2: H2Connection, sid: int, extra: list, head: bool = True) -> None:
        if head:
            h2.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/grpc"), *extra]
            )
        h2.send_data(sid, b"\0\0\0\0\0")
        h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_proxy(lane, tmp_path):
    made = []

    def start(mode: str):
        raw = _RawUpstream(mode)
        port = free_port()
        process = _start(tmp_path / f"{mode}.yaml", lane, raw.port, {"main": port})
        made.append((process, raw))
        return process, raw, port

    yield start
    for process, raw in made:
        process.stop()
        raw.close()


def _raw_call(port: int, metadata: list, calls: int) -> list:
    """Unary calls over a fresh grpcio channel's connection, as a generic stub: their status
    codes. The first ones may find no lane upstream connected yet."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    try:
        call = channel.unary_unary(
            "/pkg.Svc/Do", request_serializer=None, response_deserializer=None
        )
        results = []
        for _ in range(calls):
            try:
                call(b"hello", metadata=metadata, timeout=5)
                results.append(0)
            except grpc.RpcError as err:
                results.append(err.code().value[0])
            time.sleep(0.05)  # room for the lane's upstream to connect
        return results
    finally:
        channel.close()


def test_the_upstream_receives_the_heads_the_general_path_sends(raw_proxy, lane):
    process, raw, port = raw_proxy("answer")
    carried = Carried(process)
    assert _raw_call(port, [("x-a", "1"), ("x-b", "two"), ("grpc-timeout", "5S")], 5) == [0] * 5
    # With the lane on, the first call took the general path (no lane upstream yet), the last
    # the lane; with it off, both the general path.
    assert (carried.count() >= 1) == lane
    heads = [[(n, v) for n, v in head if n != b"grpc-timeout"] for head in raw.heads]
    assert heads[0] == heads[-1]
    names = [n for n, _ in heads[-1]]
    assert names[:4] == [b":method", b":scheme", b":authority", b":path"]
    assert names[-1] == b"te" and heads[-1][-1] == (b"te", b"trailers")
    assert (b":scheme", b"http") in heads[-1]


@pytest.mark.parametrize("mode", ["reset", "drop"])
def test_upstream_reset_or_lost_ends_the_call_unavailable(raw_proxy, lane, mode):
    process, raw, port = raw_proxy(mode)
    results = _raw_call(port, [], 5)
    assert results == [grpc.StatusCode.UNAVAILABLE.value[0]] * 5
    # Each request reached the upstream once: never resent.
    assert len(raw.heads) == 5
    snap = process.listener()
    assert snap["native_requests"] == 0  # not finished in C: handed over
    assert (snap["express_requests"] >= 1) == lane  # ... after the lane took them
    assert snap["flags"].get("UC", 0) == 5


def test_many_futures_leave_no_lane_or_session_behind(pb, proxy):  # noqa: F811
    for _ in range(20):
        channel, stub = _stub(pb, proxy.ports["main"])
        futures_ = [stub.Unary.future(pb[0].Msg(data=b"x"), timeout=5) for _ in range(5)]
        assert all(f.result().data == b"x" for f in futures_)
        channel.close()
    snap = proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert snap["connections_active"] == 0


def test_server_info_says_whether_the_lane_is_on(proxy):
    import urllib.request

    info = json.loads(urllib.request.urlopen(proxy.admin + "/server_info", timeout=5).read())
    assert info["grpc_lane"] == {"main": proxy.lane, "timed": proxy.lane}


def test_a_content_length_the_body_matches_goes_along_as_on_the_general_path(raw_proxy, lane):
    process, raw, port = raw_proxy("answer")
    client = H2Client(port)
    body = frame(b"hello")
    length = [("content-length", str(len(body)))]
    carried = Carried(process)

    def call() -> None:
        (response,) = client.wait([_h2_call(client, "/pkg.Svc/Do", body, length)])
        assert dict(response["trailers"])[b"grpc-status"] == b"0"

    _until_carried(process, call)
    assert (carried.count() == 1) == lane
    assert raw.heads[0] == raw.heads[-1]
    assert (b"content-length", b"10") in raw.heads[-1]
    client.close()


def test_a_response_head_sent_early_is_not_held_back_for_the_answer(raw_proxy, lane):
    """A server that sends its initial metadata at once and answers a second later: the client
    has the metadata long before the answer, with the lane as without it."""
    process, raw, port = raw_proxy("answer")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    quick = channel.unary_unary("/pkg.Svc/Do", request_serializer=None, response_deserializer=None)
    # a server-streaming stub: grpcio's unary stub reports the metadata only with the answer
    slow = channel.unary_stream(SLOW.decode(), request_serializer=None, response_deserializer=None)
    _until_carried(process, lambda: quick(b"hello", timeout=5))
    taken = process.listener()["express_requests"]
    started = time.monotonic()
    call = slow(b"hello", timeout=5)
    assert call.initial_metadata() is not None
    early = time.monotonic() - started
    assert list(call) == [b""]
    answered = time.monotonic() - started
    channel.close()
    assert early < 0.5 < answered, (early, answered)
    assert (process.listener()["express_requests"] - taken == 1) == lane  # the lane took it


def _taken(process) -> int:
    return process.listener()["express_requests"]


def _until_taken(process, call) -> None:
    """Make calls until the lane takes one (its upstream connected; lane on), or one call."""
    before = _taken(process)
    for _ in range(100 if process.lane else 1):
        call()
        if _taken(process) > before:
            return
        time.sleep(0.02)
    assert not process.lane, "the lane took no call"


def test_grpc_timeout_is_enforced_by_the_sidecar_for_lane_calls(raw_proxy, lane):
    """A caller that never cancels (raw h2) and a server that never answers: the sidecar answers
    DEADLINE_EXCEEDED itself, as a trailers-only response, and cancels the call upstream. (A
    grpcio server would end the call at the same deadline too, racing the sidecar.)"""
    process, raw, port = raw_proxy("answer")
    client = H2Client(port)
    try:
        _until_taken(process, lambda: client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))]))
        carried = Carried(process)
        before = process.listener()
        started = time.monotonic()
        sid = _h2_call(client, SILENT.decode(), frame(b"x"), [("grpc-timeout", "300m")])
        head = _wait_trailers_only(client, sid)
        assert 0.25 < time.monotonic() - started < 2.5
        assert head[b"grpc-status"] == b"4" and head[b":status"] == b"200"
        deadline = time.monotonic() + 2
        while not raw.resets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(raw.resets) == 1
        assert sum(SILENT in dict(h).get(b":path", b"") for h in raw.heads) == 1  # sent once

        def statuses(snap):
            return snap["grpc"]["methods"].get("pkg.Svc/Silent", {}).get("statuses", {})

        after = process.wait_for(lambda s: statuses(s).get("DEADLINE_EXCEEDED", 0) >= 1)
        assert statuses(after) == {"DEADLINE_EXCEEDED": 1}
        assert after["flags"].get("UT", 0) - before["flags"].get("UT", 0) == 1
        # Taken by the lane with the lane on, then handed over when due: not finished in C.
        assert after["express_requests"] - before["express_requests"] == (1 if lane else 0)
        assert carried.count() == 0
    finally:
        client.close()


def test_a_deadline_after_the_response_head_ends_the_call_with_trailers(raw_proxy, lane):
    """The server sends its head at once and the rest a second later; the call's grpc-timeout
    passes in between: the sidecar ends the call itself with trailers after that head (not a
    second head), and the server's late answer never reaches the client. (The reset upstream
    is checked with a server that never answers: this one has ended the stream by the time it
    reads the reset, which h2 then drops.)"""
    process, raw, port = raw_proxy("answer")
    client = H2Client(port)
    try:
        _until_taken(process, lambda: client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))]))
        before = process.listener()
        started = time.monotonic()
        sid = _h2_call(client, SLOW.decode(), frame(b"x"), [("grpc-timeout", "300m")])
        (response,) = client.wait([sid])
        assert 0.25 < time.monotonic() - started < 0.9  # not the server's answer, due at 1 s
        assert response["status"] == 200 and response["reset"] is None
        assert dict(response["trailers"])[b"grpc-status"] == b"4"
        assert bytes(response["body"]) == b""
        after = process.wait_for(lambda s: s["flags"].get("UT", 0) > before["flags"].get("UT", 0))
        assert after["flags"].get("UT", 0) - before["flags"].get("UT", 0) == 1
    finally:
        client.close()


def test_an_empty_request_body_goes_upstream(raw_proxy, lane):
    """HEADERS, then an empty DATA frame that ends the stream: a call like any other."""
    process, raw, port = raw_proxy("answer")
    client = H2Client(port)
    _until_taken(process, lambda: client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))]))
    taken, calls = _taken(process), len(raw.heads)
    (response,) = client.wait([_h2_call(client, "/pkg.Svc/Do", b"")])
    client.close()
    assert response["reset"] is None and dict(response["trailers"])[b"grpc-status"] == b"0"
    assert len(raw.heads) == calls + 1
    assert (_taken(process) - taken == 1) == lane


@pytest.mark.parametrize("mode", ["odd", "long"])
def test_a_response_head_the_general_path_would_change_is_not_sent_as_it_is(raw_proxy, lane, mode):
    """A head with a hop-by-hop field (stripped) or a Content-Length (checked against the body:
    this one's 5 bytes break its promise of 99, so the call is reset, as malformed) is the
    general path's to send: the lane takes the call but does not finish it in C."""
    process, raw, port = raw_proxy(mode)
    client = H2Client(port)
    _until_taken(process, lambda: client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))]))
    taken, finished = _taken(process), Carried(process)
    malformed = process.listener()["flags"].get("UPE", 0)
    (response,) = client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))])
    client.close()
    assert (_taken(process) - taken == 1) == lane
    assert finished.count() == 0
    if mode == "odd":
        assert dict(response["trailers"])[b"grpc-status"] == b"0"
        assert b"trailer" not in dict(response["headers"])
    else:
        assert response["reset"] is not None and response["trailers"] is None
        flags = process.wait_for(lambda s: s["flags"].get("UPE", 0) > malformed)["flags"]
        assert flags["UPE"] == malformed + 1


def test_more_answers_in_one_upstream_read_than_c_finishes_at_once(raw_proxy, lane):
    """BATCH calls answered in one write: the ones C has no room for go on through Python."""
    process, raw, port = raw_proxy("batch")
    client = H2Client(port)
    _until_taken(process, lambda: client.wait([_h2_call(client, "/pkg.Svc/Do", frame(b"x"))]))
    taken = _taken(process)
    sids = [_h2_call(client, "/pkg.Svc/Do", frame(b"x")) for _ in range(100)]
    time.sleep(0.1)  # a second downstream read: each read takes at most 128 calls
    sids += [_h2_call(client, "/pkg.Svc/Do", frame(b"x")) for _ in range(BATCH - 100)]
    responses = client.wait(sids, timeout=15)
    client.close()
    assert all(
        r["done"] and dict(r["trailers"] or {}).get(b"grpc-status") == b"0" for r in responses
    )
    assert (_taken(process) - taken == BATCH) == lane
