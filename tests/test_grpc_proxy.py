"""gRPC mode through a real pyproxy process: real grpcio clients and servers from a test proto compiled at
test time, plus a raw h2 client (tests/h2_peer.py) for what grpcio never sends (bad framing, no deadline)."""

from __future__ import annotations

import importlib
import json
import queue
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from conftest import ProxyProcess, free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from h2.events import ResponseReceived, StreamEnded, TrailersReceived
from h2_peer import H2Client

from pyproxy.codec.grpc import frame

PROTO = """
syntax = "proto3";
package pyproxytest;
message Msg {
  bytes data = 1;
  int32 delay_ms = 2;   // the server waits this long (watching for cancellation)
  int32 count = 3;      // server streaming: how many replies
  int32 code = 4;       // the status the server ends the call with
  string text = 5;      // its grpc-message
  int32 reply_size = 6; // size of the reply's data (default: echo)
}
service Echo {
  rpc Unary(Msg) returns (Msg);
  rpc ServerStream(Msg) returns (stream Msg);
  rpc ClientStream(stream Msg) returns (Msg);
  rpc Bidi(stream Msg) returns (stream Msg);
}
"""
BIG = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", BIG),
    ("grpc.max_receive_message_length", BIG),
    ("grpc.enable_http_proxy", 0),
]
PROXY_LIMIT = 5 * 1024 * 1024  # lets 4 MiB messages through; 6 MiB ones are the proxy's to refuse
SERVICE = "pyproxytest.Echo"


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto")
    (out / "echo.proto").write_text(PROTO)
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", "echo.proto"]) == 0  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))


class Upstream:
    """The app: an Echo service plus grpc.health.v1, recording what it saw (cancellations, metadata)."""

    def __init__(self, pb) -> None:
        messages, services = pb
        self.pb = messages
        self.cancelled: queue.Queue = queue.Queue()
        self.metadata: list = []
        outer = self

        class Servicer(services.EchoServicer):
            def Unary(self, request, context):
                handled = outer._watch(context)
                outer.metadata.append(dict(context.invocation_metadata()))
                outer._wait(request.delay_ms, context)
                handled.set()
                context.send_initial_metadata([("x-initial", "i1")])
                context.set_trailing_metadata([("x-trailer", "t1"), ("x-bin-bin", b"\x00\xff")])
                if request.code:
                    context.set_code(grpc.StatusCode(_code(request.code)))
                    context.set_details(request.text)
                    return None
                return messages.Msg(data=_reply(request))

            def ServerStream(self, request, context):
                handled = outer._watch(context)
                for _ in range(request.count):
                    if not outer._wait(request.delay_ms, context):
                        return
                    yield messages.Msg(data=_reply(request))
                handled.set()

            def ClientStream(self, request_iterator, context):
                count = size = 0
                for message in request_iterator:
                    count += 1
                    size += len(message.data)
                return messages.Msg(count=count, data=b"%d" % size)

            def Bidi(self, request_iterator, context):
                for message in request_iterator:
                    yield messages.Msg(data=message.data[::-1], count=message.count)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=GRPC_OPTIONS)
        services.add_EchoServicer_to_server(Servicer(), self.server)
        self.health = health.HealthServicer()
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _watch(self, context) -> threading.Event:
        """Record the call as cancelled if it ends before the handler sets the returned event.

        The termination callback, not the handler, records it: grpcio stops resuming a
        streaming handler whose call was cancelled while a reply was being sent, so a check
        inside the handler can miss a cancellation that did reach the server."""
        handled = threading.Event()

        def ended() -> None:
            if not handled.is_set():
                self.cancelled.put(time.monotonic())

        if not context.add_callback(ended):
            ended()
        return handled

    @staticmethod
    def _wait(delay_ms: int, context) -> bool:
        """Sleep in steps, as a careful server does; False once the call is no longer active."""
        deadline = time.monotonic() + delay_ms / 1000
        while time.monotonic() < deadline:
            if not context.is_active():
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.server.stop(0)


def _code(number: int):
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def _reply(request) -> bytes:
    return b"r" * request.reply_size if request.reply_size else request.data


@pytest.fixture(scope="module")
def upstream(pb):
    server = Upstream(pb)
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory, h2_codec):
    tmp = tmp_path_factory.mktemp("proxy")
    ports = {name: free_port() for name in ("main", "down", "fault", "http", "timed")}
    log = tmp / "access.log"
    config = tmp / "proxy.yaml"
    config.write_text(
        f"""
listeners:
  - name: main
    mode: grpc
    address: 127.0.0.1:{ports["main"]}
    upstream: 127.0.0.1:{upstream.port}
    http: {{access_log: {log}, max_concurrent_streams: 300, http2_codec: {h2_codec}}}
    grpc: {{max_request_message_bytes: {PROXY_LIMIT}, max_response_message_bytes: {PROXY_LIMIT}}}
  - name: down
    mode: grpc
    address: 127.0.0.1:{ports["down"]}
    http: {{http2_codec: {h2_codec}}}
    upstream: 127.0.0.1:{free_port()}
  - name: fault
    mode: grpc
    address: 127.0.0.1:{ports["fault"]}
    http: {{http2_codec: {h2_codec}}}
    upstream: 127.0.0.1:{upstream.port}
    filters:
      - name: fault
        config: {{abort: {{grpc_status: 9, percentage: 100}}}}
  - name: http
    mode: http
    address: 127.0.0.1:{ports["http"]}
    upstream: 127.0.0.1:{upstream.port}
    http: {{upstream_protocol: http2, http2_codec: {h2_codec}}}
  - name: timed
    mode: grpc
    address: 127.0.0.1:{ports["timed"]}
    http: {{http2_codec: {h2_codec}}}
    upstream: 127.0.0.1:{upstream.port}
    routes:
      - match: {{prefix: /}}
        timeout: 600ms
"""
    )
    process = ProxyProcess(["-c", str(config)]).wait_ready()
    process.ports = ports
    process.access_log = log
    yield process
    process.stop()


def _stub(pb, port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    return channel, pb[1].EchoStub(channel)


@pytest.fixture
def echo(pb, proxy):
    channel, stub = _stub(pb, proxy.ports["main"])
    yield stub
    channel.close()


def test_unary_messages_of_0_100_bytes_and_4_mib_arrive_intact(pb, echo):
    Msg = pb[0].Msg
    for size in (0, 100, 4 * 1024 * 1024):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        reply = echo.Unary(Msg(data=data), timeout=20)
        assert reply.data == data
    # 4 MiB the other way: a small request, a large reply.
    assert len(echo.Unary(Msg(reply_size=4 * 1024 * 1024), timeout=20).data) == 4 * 1024 * 1024


def test_server_client_and_bidirectional_streaming(pb, echo):
    Msg = pb[0].Msg
    replies = list(echo.ServerStream(Msg(data=b"s" * 100, count=50), timeout=10))
    assert [r.data for r in replies] == [b"s" * 100] * 50
    sizes = [0, 100, 70_000, 1, 4 * 1024 * 1024]
    reply = echo.ClientStream(iter(Msg(data=b"c" * n) for n in sizes), timeout=20)
    assert reply.count == len(sizes) and reply.data == b"%d" % sum(sizes)
    # Interleaved: each request is only sent once the reply to the previous one has arrived.
    outgoing: queue.Queue = queue.Queue()
    call = echo.Bidi(iter(outgoing.get, None), timeout=10)
    for i in range(20):
        outgoing.put(Msg(data=b"m%03d" % i, count=i))
        answer = next(call)
        assert answer.data == (b"m%03d" % i)[::-1] and answer.count == i
    outgoing.put(None)
    assert list(call) == []


def test_many_concurrent_calls_share_one_channel(pb, echo, proxy):
    before = proxy.listener()["connections_total"]
    Msg = pb[0].Msg
    calls = [echo.Unary.future(Msg(data=b"%d" % i, delay_ms=20), timeout=20) for i in range(300)]
    assert [c.result().data for c in calls] == [b"%d" % i for i in range(300)]
    assert proxy.listener()["connections_total"] - before <= 1  # one HTTP/2 connection


def test_metadata_and_trailing_metadata_cross_both_ways(pb, echo, upstream):
    _, call = echo.Unary.with_call(
        pb[0].Msg(data=b"hi"),
        metadata=[("x-custom", "v1"), ("x-raw-bin", b"\x00\x01\xff")],
        timeout=5,
    )
    seen = upstream.metadata[-1]
    assert seen["x-custom"] == "v1" and seen["x-raw-bin"] == b"\x00\x01\xff"
    assert ("x-initial", "i1") in call.initial_metadata()
    trailing = dict(call.trailing_metadata())
    assert trailing["x-trailer"] == "t1" and trailing["x-bin-bin"] == b"\x00\xff"


def test_every_status_code_arrives_unchanged_with_its_message(pb, echo):
    for number in range(1, 17):
        text = f"status {number}: ünïcödé, 100% \r\n tricky"
        with pytest.raises(grpc.RpcError) as info:
            echo.Unary(pb[0].Msg(code=number, text=text), timeout=5)
        assert info.value.code() == _code(number), number
        assert info.value.details() == text
        assert dict(info.value.trailing_metadata())["x-trailer"] == "t1"


def test_deadline_reaches_client_and_server_sees_cancellation(pb, echo, upstream):
    _drain(upstream.cancelled)
    with pytest.raises(grpc.RpcError) as info:
        echo.Unary(pb[0].Msg(delay_ms=3000), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.cancelled.get(timeout=2)


def test_sidecar_enforces_grpc_timeout_itself(proxy, upstream, pb):
    """A caller that never cancels (raw h2) gets DEADLINE_EXCEEDED on time, before and after
    replies flowed, and the server sees the cancel. (This grpcio server ends the call at the same
    forwarded deadline; that the sidecar does it alone is checked in test_grpc_lane.py with
    servers that do not.)"""
    _drain(upstream.cancelled)
    client = H2Client(proxy.ports["main"])
    started = time.monotonic()
    sid = _raw_call(
        client,
        "/pyproxytest.Echo/Unary",
        frame(pb[0].Msg(delay_ms=5000).SerializeToString()),
        [("grpc-timeout", "300m")],
    )
    head = _wait_trailers_only(client, sid)
    assert 0.25 < time.monotonic() - started < 2.5
    assert head[b"grpc-status"] == b"4" and head[b":status"] == b"200"
    assert head[b"content-type"] == b"application/grpc"
    assert upstream.cancelled.get(timeout=2)
    # Once replies flowed, the deadline ends the call with trailers after the last whole message.
    request = frame(pb[0].Msg(data=b"z", count=100, delay_ms=100).SerializeToString())
    sid = _raw_call(client, "/pyproxytest.Echo/ServerStream", request, [("grpc-timeout", "350m")])
    (response,) = client.wait([sid])
    assert response["status"] == 200 and response["reset"] is None
    assert dict(response["trailers"])[b"grpc-status"] == b"4"
    body = bytes(response["body"])
    assert body and len(body) % len(frame(b"\x0a\x01z")) == 0  # whole messages only
    assert upstream.cancelled.get(timeout=2)
    client.close()


def test_client_cancel_reaches_the_server(pb, echo, upstream):
    _drain(upstream.cancelled)
    call = echo.ServerStream(pb[0].Msg(data=b"x", count=1000, delay_ms=50), timeout=20)
    assert next(call).data == b"x"
    call.cancel()
    assert upstream.cancelled.get(timeout=3)


def test_health_checking_service_works_through_the_proxy(proxy):
    with grpc.insecure_channel(f"127.0.0.1:{proxy.ports['main']}", options=GRPC_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_an_explicit_route_timeout_ends_a_started_stream_with_deadline_exceeded(pb, proxy):
    channel, stub = _stub(pb, proxy.ports["timed"])
    with channel:
        call = stub.ServerStream(pb[0].Msg(data=b"s", count=100, delay_ms=100), timeout=20)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in call:
                received.append(reply.data)
    # The messages relayed before the deadline arrived whole; then trailers, not a reset.
    assert 2 <= len(received) < 10 and set(received) == {b"s"}
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details() == "route timeout at the sidecar"


def test_oversized_messages_are_resource_exhausted_both_ways(pb, echo):
    big = 6 * 1024 * 1024
    with pytest.raises(grpc.RpcError) as info:
        echo.Unary(pb[0].Msg(data=b"x" * big), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        f"exceeds the {PROXY_LIMIT}-byte limit" in info.value.details()
    )  # the sidecar's, not grpc's
    with pytest.raises(grpc.RpcError) as info:
        echo.Unary(pb[0].Msg(reply_size=big), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"exceeds the {PROXY_LIMIT}-byte limit" in info.value.details()
    assert echo.Unary(pb[0].Msg(data=b"after"), timeout=5).data == b"after"


def test_malformed_framing_is_internal_and_resets_only_that_stream(proxy, pb):
    client = H2Client(proxy.ports["main"])
    ok = frame(pb[0].Msg(data=b"fine").SerializeToString())
    for bad in (
        b"\x02\x00\x00\x00\x01x",
        ok[:-1],
    ):  # bad compressed flag; truncated at end of stream
        sid = _raw_call(client, "/pyproxytest.Echo/Unary", bad)
        head = _wait_trailers_only(client, sid)
        assert head[b"grpc-status"] == b"13", head
        # The same connection still carries calls.
        sid = _raw_call(client, "/pyproxytest.Echo/Unary", ok)
        (response,) = client.wait([sid])
        assert dict(response["trailers"])[b"grpc-status"] == b"0"
        assert pb[0].Msg.FromString(bytes(response["body"])[5:]).data == b"fine"
    assert client.terminated is None and not client.eof
    client.close()


def test_upstream_down_is_unavailable_as_one_headers_frame(pb, proxy):
    channel, stub = _stub(pb, proxy.ports["down"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Unary(pb[0].Msg(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "upstream connect error" in info.value.details()
    channel.close()
    client = H2Client(proxy.ports["down"])
    head = _wait_trailers_only(client, _raw_call(client, "/pyproxytest.Echo/Unary", frame(b"")))
    assert head[b"grpc-status"] == b"14" and head[b":status"] == b"200"
    client.close()


def test_fault_abort_reaches_the_client_as_its_grpc_status(pb, proxy):
    channel, stub = _stub(pb, proxy.ports["fault"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Unary(pb[0].Msg(), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fault filter abort" in info.value.details()
    channel.close()


def test_http1_on_a_grpc_listener_gets_a_clear_error(proxy):
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy.ports['main']}/pyproxytest.Echo/Unary"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 505 and b"HTTP/2 only" in info.value.read()


def test_grpc_calls_on_an_http_listener_are_recognised(pb, proxy):
    channel, stub = _stub(pb, proxy.ports["http"])
    assert stub.Unary(pb[0].Msg(data=b"via http mode"), timeout=5).data == b"via http mode"
    channel.close()
    grpc_stats = proxy.wait_for(lambda s: "grpc" in s, name="http")["grpc"]
    assert grpc_stats["methods"]["pyproxytest.Echo/Unary"]["statuses"] == {"OK": 1}


def test_metrics_and_access_log_by_method_and_status(pb, echo, proxy):
    before = proxy.listener()["grpc"]
    echo.Unary(pb[0].Msg(data=b"a"), timeout=5)
    with pytest.raises(grpc.RpcError):
        echo.Unary(pb[0].Msg(code=5, text="gone"), timeout=5)
    list(echo.ServerStream(pb[0].Msg(data=b"b", count=3), timeout=5))
    name = "pyproxytest.Echo/Unary"

    def done(snap):
        return snap["grpc"]["calls_finished"] >= before["calls_finished"] + 3

    after = proxy.wait_for(done)["grpc"]
    unary, old = after["methods"][name], before["methods"][name]
    assert unary["started"] == old["started"] + 2
    assert unary["statuses"]["OK"] == old["statuses"]["OK"] + 1
    assert unary["statuses"]["NOT_FOUND"] == old["statuses"].get("NOT_FOUND", 0) + 1
    assert after["messages"]["received"] - before["messages"]["received"] == 3
    assert after["messages"]["sent"] - before["messages"]["sent"] == 1 + 3
    assert after["duration"]["count"] >= before["duration"]["count"] + 3
    text = urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=5).read().decode()
    assert (
        f'pyproxy_grpc_calls_total{{grpc_status="NOT_FOUND",listener="main",method="{name}"}}'
        in text
    )
    assert f'pyproxy_grpc_calls_started_total{{listener="main",method="{name}"}}' in text
    assert 'pyproxy_grpc_messages_total{direction="received",listener="main"}' in text
    assert "pyproxy_grpc_call_duration_seconds_bucket" in text
    deadline = time.monotonic() + 5
    records = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in proxy.access_log.read_text().splitlines()]
        if any(r.get("grpc_message") == "gone" for r in records):
            break
        time.sleep(0.05)
    gone = next(r for r in records if r.get("grpc_message") == "gone")
    assert gone["grpc_status"] == 5 and gone["grpc_method"] == name
    assert gone["status"] == 200 and gone["grpc_messages_received"] == 1


def test_unknown_methods_past_the_table_count_as_other(proxy):
    client = H2Client(proxy.ports["main"])
    sids = [_raw_call(client, f"/junk.S{i}/M", frame(b"")) for i in range(40)]
    client.wait(sids)
    client.close()
    methods = proxy.wait_for(lambda s: "other" in s["grpc"]["methods"])["grpc"]["methods"]
    assert "other" in methods and len(methods) <= 33  # 32 entries per worker, then "other"
    assert methods["other"]["statuses"].get("UNIMPLEMENTED", 0) >= 1


# ---- raw HTTP/2 helpers ------------------------------------------------------------------


def _raw_call(client: H2Client, path: str, body: bytes, extra: list | None = None) -> int:
    headers = [("content-type", "application/grpc"), ("te", "trailers")] + (extra or [])
    return client.request(path, "POST", headers=headers, body=body)


def _wait_trailers_only(client: H2Client, sid: int, timeout: float = 5.0) -> dict:
    """Read until the stream's response; assert it came as ONE HEADERS frame with END_STREAM."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.read_once():
            if getattr(event, "stream_id", None) != sid:
                continue
            assert not isinstance(event, TrailersReceived | StreamEnded), "expected trailers-only"
            if isinstance(event, ResponseReceived):
                assert event.stream_ended is not None, "HEADERS without END_STREAM"
                return dict(event.headers)
    raise AssertionError("no response")


def _drain(q: queue.Queue) -> None:
    while not q.empty():
        q.get_nowait()


def test_cli_grpc_mode_with_two_workers_merges_methods_by_name(pb, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy("--mode", "grpc", "--listen", f"127.0.0.1:{port}", "--upstream",
                        f"127.0.0.1:{upstream.port}", "--concurrency", "2")  # fmt: skip
    for i in range(12):  # a channel each: SO_REUSEPORT spreads the connections over both workers
        # grpcio shares connections between channels to one target unless told not to.
        options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        stub = pb[1].EchoStub(channel)
        assert stub.Unary(pb[0].Msg(data=b"%d" % i), timeout=5).data == b"%d" % i
        channel.close()
    snap = proxy.wait_for(lambda s: s["grpc"]["calls_finished"] >= 12)
    assert snap["mode"] == "grpc"
    assert snap["grpc"]["methods"] == {
        "pyproxytest.Echo/Unary": {"started": 12, "statuses": {"OK": 12}}
    }
    assert snap["grpc"]["messages"] == {"received": 12, "sent": 12}
    info = json.loads(urllib.request.urlopen(proxy.admin + "/server_info", timeout=5).read())
    assert all(w["connections_total"] > 0 for w in info["workers"])  # both workers took calls
