"""HTTP/2 mode through a real pyproxy process with real peers: curl, nghttp, h2load and h2-based
clients and servers (tests/h2_peer.py), plus the HTTP/1.1 upstream of tests/http_peer.py."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import curl, http_get, require_capability, start_listener
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError as H2ProtocolError
from h2_peer import H2Client, H2Upstream
from hyperframe.frame import ContinuationFrame, HeadersFrame

from pyproxy.codec.http2 import PREFACE, FrameScanner, HeaderBlockTooLarge, goaway_frame

REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB


# Whether this module's proxies run with the HTTP/2 lane on (the `lane` fixture sets it).
LANE = {"on": False}


@pytest.fixture(scope="module", autouse=True, params=[False, True], ids=["lane-off", "lane-on"])
def lane(request, h2_codec) -> bool:
    """Every test here also runs with `http2_lane: true` (on the native codec, which it rides):
    what the lane does not carry must go on exactly as without it."""
    LANE["on"] = request.param
    return request.param


def _proxy(
    start_proxy, tmp_path, codec: str, upstream: str, protocol: str = "http1", http: str = "", **kw
):
    body = (
        f"    http:\n      upstream_protocol: {protocol}\n      http2_codec: {codec}\n"
        f"      http2_lane: {'true' if LANE['on'] else 'false'}\n{http}"
    )
    top = f"drain_timeout: {kw.get('drain', '5s')}\n{kw.get('top', '')}"
    return start_listener(start_proxy, tmp_path, upstream, body, top=top)


def test_h2_client_to_h1_upstream_translates_both_ways(start_proxy, tmp_path, h2_codec, upstream):
    log = tmp_path / "access.log"
    proxy, port = _proxy(
        start_proxy, tmp_path, h2_codec, upstream.address, http=f"      access_log: {log}\n"
    )
    body = b"q" * 300_000
    result = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-H", "Cookie: a=1", "-H", "Cookie: b=2",
         "--data-binary", "@-", "-H", "Content-Type: x/y", f"http://127.0.0.1:{port}/echo"],
        input=body, capture_output=True, timeout=20,
    )  # fmt: skip
    info = json.loads(result.stdout)
    headers = dict((n, v) for n, v in info["headers"])
    assert info["body_length"] == len(body) and info["method"] == "POST"
    assert headers["host"] == f"127.0.0.1:{port}"  # :authority became Host (RFC 9113 §8.3.1)
    assert headers["cookie"] == "a=1; b=2"  # crumbs joined for HTTP/1.1 (§8.2.3)
    # An upload of unknown length over HTTP/2 reaches HTTP/1.1 chunked.
    client = H2Client(port)
    sid = client.request("/echo", "POST", body=b"x" * 70_000, trailers=[("x-t", "1")])
    (response,) = client.wait([sid])
    echoed = json.loads(bytes(response["body"]))
    assert response["status"] == 200 and echoed["body_length"] == 70_000
    assert ["transfer-encoding", "chunked"] in echoed["headers"]
    # An HTTP/1.1 chunked response becomes DATA frames; no connection-specific fields (§8.2.2).
    sid = client.request("/chunked?n=20")
    (response,) = client.wait([sid])
    names = {n for n, _ in response["headers"]}
    assert bytes(response["body"]) == b"c" * 20_000
    assert not names & {b"transfer-encoding", b"connection", b"keep-alive"}
    client.close()
    proxy.wait_for(lambda s: s["requests"] == 3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(log.read_text().splitlines()) < 3:
        time.sleep(0.05)
    assert json.loads(log.read_text().splitlines()[0])["protocol"] == "HTTP/2"
    assert proxy.listener()["stages"]["parse"]["ns"] > 0
    info = json.loads(http_get(proxy.admin + "/server_info")[1])
    assert info["http2_codec"] == {"main": h2_codec}


def test_h1_client_to_h2_upstream_translates_with_trailers(
    start_proxy, tmp_path, h2_codec, h2_upstream
):
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    url = f"http://127.0.0.1:{port}"
    result = curl("-H", "Connection: keep-alive, X-Hop", "-H", "X-Hop: 1", "-H", "TE: trailers",
                  "--data-binary", "hello", url + "/echo")  # fmt: skip
    info = json.loads(result.stdout)
    names = [n for n, _ in info["headers"]]
    assert info["authority"] == f"127.0.0.1:{port}" and "host" not in names
    assert info["body_length"] == 5 and info["method"] == "POST"
    assert not {"connection", "x-hop", "keep-alive"} & set(names)
    assert ["te", "trailers"] in info["headers"]  # only TE: trailers may cross (§8.2.2)
    # gRPC-style trailers from the h2 upstream reach an HTTP/1.1 client as chunked trailers.
    raw = curl("--raw", "-D", "-", "-H", "TE: trailers", url + "/trailers").stdout
    assert b"transfer-encoding: chunked" in raw.lower()
    assert raw.endswith(b"0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n")
    assert curl(url + "/plain").stdout == b"ok:/plain:h2up"
    assert h2_upstream.connections == 1  # one shared connection for every exchange


def test_multiplexed_streams_and_upstream_stream_limit(start_proxy, tmp_path, h2_codec):
    upstream = H2Upstream(max_streams=8)
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, upstream.address, "http2")
    client = H2Client(port)
    sids = [client.request(f"/slow?ms=300&i={i}", flush=False) for i in range(40)]
    client.flush()
    started = time.monotonic()
    responses = client.wait(sids, timeout=15)
    elapsed = time.monotonic() - started
    assert [r["status"] for r in responses] == [200] * 40
    assert all(bytes(r["body"]) == b"slow" for r in responses)
    assert elapsed < 3  # concurrent, not 40 x 300 ms
    # 8 streams per connection allowed by the app: the pool opened more connections.
    assert upstream.connections >= 5
    client.close()
    upstream.close()


def test_trailers_h2_to_h2(start_proxy, tmp_path, h2_codec, h2_upstream):
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    client = H2Client(port)
    up = client.request(
        "/echo", "POST", headers=[("te", "trailers")], body=b"grpc" * 1000,
        trailers=[("grpc-timeout", "1S")],
    )  # fmt: skip
    down = client.request("/trailers", headers=[("te", "trailers")])
    sent, received = client.wait([up, down])
    assert json.loads(bytes(sent["body"]))["trailers"] == [["grpc-timeout", "1S"]]
    assert bytes(received["body"]) == b"data"
    assert received["trailers"] == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    client.close()


def test_a_response_ended_by_its_trailers_is_not_cancelled_upstream(
    start_proxy, tmp_path, h2_codec, h2_upstream
):
    # Trailers end the upstream stream (END_STREAM on them): releasing it afterwards must not
    # send RST_STREAM CANCEL for a call that completed.
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    client = H2Client(port)
    sids = [client.request("/trailers", headers=[("te", "trailers")]) for _ in range(3)]
    for received in client.wait(sids):
        assert received["trailers"] == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
    client.request("/echo")  # one more round trip: anything sent after the trailers is in
    client.wait([sids[-1] + 2])
    assert h2_upstream.rst_frames == []
    client.close()


def test_a_request_body_read_with_its_end_leaves_in_one_data_frame(
    start_proxy, tmp_path, h2_codec, h2_upstream
):
    # A body and END_STREAM read together are pumped once after the read (FlushQueue.handle):
    # END_STREAM rides the body's last DATA frame, never an empty frame of its own, on either
    # codec; the bodies arrive whole and the windows go on being given back.
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    client = H2Client(port)
    bodies = [bytes([65 + i]) * (1000 + i) for i in range(4)]
    for round_ in range(3):  # more than one window's worth over the connection
        sids = [client.request("/echo", "POST", body=body * 20) for body in bodies]
        for body, received in zip(bodies, client.wait(sids), strict=True):
            echo = json.loads(bytes(received["body"]))
            assert received["status"] == 200 and echo["body_length"] == len(body) * 20, round_
    assert h2_upstream.empty_end_frames == 0
    client.close()


def test_idle_clocks_close_quiet_connections_and_spare_busy_ones(
    start_proxy, tmp_path, h2_codec, h2_upstream
):
    # One timer per idle period (not an arm and a cancel per stream): a connection that keeps
    # serving past the timeout stays open; one quiet for the whole timeout gets GOAWAY (the
    # downstream) or is closed (the pooled upstream).
    clusters = (
        f"clusters:\n  app:\n    endpoints: [{h2_upstream.address}]\n    protocol: http2\n"
        "    idle_timeout: 600ms\n"
    )
    http = (
        "      idle_timeout: 600ms\n    routes:\n      - match: {prefix: /}\n        cluster: app\n"
    )
    proxy, port = _proxy(
        start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2", http=http, top=clusters
    )
    client = H2Client(port)
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # 2.5 timeouts' worth, never 600 ms quiet
        sid = client.request("/echo")
        assert client.wait([sid])[0]["status"] == 200
        last = time.monotonic()
        time.sleep(0.1)
    assert client.terminated is None and not client.eof
    assert h2_upstream.connections == 1  # the pooled upstream stayed too
    while client.terminated is None and not client.eof and time.monotonic() - last < 3:
        client.read_once()
    assert client.terminated is not None and client.terminated.error_code == 0
    assert 0.55 < time.monotonic() - last < 2.0  # the timeout from the last stream's end
    client.close()
    # The upstream connection, idle as long, was closed: the next request opens another.
    time.sleep(0.3)
    client = H2Client(port)
    sid = client.request("/echo")
    assert client.wait([sid])[0]["status"] == 200
    assert h2_upstream.connections == 2
    client.close()


def test_rst_stream_propagates_both_ways(start_proxy, tmp_path, h2_codec, h2_upstream):
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    client = H2Client(port)
    # Downstream reset → the upstream stream is cancelled.
    sid = client.request("/hang")
    deadline = time.monotonic() + 5
    while not h2_upstream.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    client.conn.reset_stream(sid, 0x8)
    client.flush()
    while not h2_upstream.resets and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h2_upstream.resets and h2_upstream.resets[0][1] == 0x8  # CANCEL
    # Upstream reset before the response → 503; after it → the downstream stream is reset.
    before = client.request("/reset")
    after = client.request("/reset-after")
    before_r, after_r = client.wait([before, after])
    assert before_r["status"] == 503 and before_r["reset"] is None
    assert after_r["status"] == 200 and after_r["reset"] is not None
    # The connection survives both.
    ok = client.request("/fine")
    assert client.wait([ok])[0]["status"] == 200
    client.close()
    flags = proxy.wait_for(lambda s: s["flags"].get("UR") == 1)["flags"]
    assert flags.get("UC") == 1 and flags.get("UR") == 1 and flags.get("DR") == 1


def test_goaway_on_sigterm_drain_lets_streams_finish(start_proxy, tmp_path, h2_codec, upstream):
    require_capability(
        "nghttp (nghttp2-client; make test installs it)", shutil.which("nghttp") is not None
    )
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, upstream.address)
    run = subprocess.Popen(
        ["nghttp", "-v", "-t", "10", f"http://127.0.0.1:{port}/slow?ms=800",
         f"http://127.0.0.1:{port}/slow?ms=900"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while proxy.listener()["requests"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=15)
    assert "recv GOAWAY frame" in out and "NO_ERROR" in out, out
    assert out.count(":status: 200") == 2, out
    assert out.count("slow") >= 2
    assert proxy.proc.wait(10) == 0


def test_flow_control_bounds_memory_with_a_slow_h2_reader(
    start_proxy, tmp_path, h2_codec, h2_upstream
):
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2")
    baseline = proxy.rss_kib()
    proc = subprocess.Popen(
        ["curl", "-sS", "--http2-prior-knowledge", "--limit-rate", "40M", "-o", "/dev/null",
         "-w", "%{size_download}", f"http://127.0.0.1:{port}/big?mb=100"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    peak = 0
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        peak = max(peak, proxy.rss_kib())
        time.sleep(0.05)
    assert proc.stdout.read() == str(100 * 1024 * 1024).encode()
    # Windows are acknowledged only once the other side took the bytes.
    assert peak - baseline < 24 * 1024, (baseline, peak)


def test_max_concurrent_streams_refused(start_proxy, tmp_path, h2_codec, upstream):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        h2_codec,
        upstream.address,
        http="      max_concurrent_streams: 5\n",
    )
    client = H2Client(port)
    # Sent before the proxy's SETTINGS could be read: the client cannot know the limit yet.
    sids = [client.request(f"/slow?ms=400&i={i}", flush=False) for i in range(8)]
    client.flush()
    responses = client.wait(sids)
    assert client.conn.remote_settings.max_concurrent_streams == 5  # advertised
    assert [r["status"] for r in responses].count(200) == 5
    assert [r["reset"] for r in responses].count(REFUSED_STREAM) == 3
    again = client.request("/after")
    assert client.wait([again])[0]["status"] == 200  # refusing is per stream (§5.1.2)
    client.close()


def test_rapid_reset_gets_goaway_enhance_your_calm(start_proxy, tmp_path, h2_codec, h2_upstream):
    proxy, port = _proxy(
        start_proxy, tmp_path, h2_codec, h2_upstream.address, "http2",
        http="      rapid_reset_max: 20\n      rapid_reset_window: 10s\n",
    )  # fmt: skip
    client = H2Client(port)
    for _ in range(60):
        sid = client.request("/hang", flush=False)
        client.conn.reset_stream(sid, 0x8)
    client.flush()
    deadline = time.monotonic() + 5
    while client.terminated is None and not client.eof and time.monotonic() < deadline:
        try:
            client.read_once()
        except (ConnectionResetError, H2ProtocolError):
            break
    assert client.terminated is not None and client.terminated.error_code == ENHANCE_YOUR_CALM
    assert proxy.listener()["flags"].get("DPE") == 1
    assert curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/x").stdout == b"ok:/x:h2up"


def test_h2_alone_buffers_a_continuation_flood_the_scanner_does_not():
    # h2 holds up to 64 CONTINUATION frames (1 MiB at the default frame size) before it objects.
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    first = HeadersFrame(1, data=b"\x82", flags=["END_STREAM"])
    flood = [ContinuationFrame(1, data=b"\x00" * 16384) for _ in range(60)]
    wire = PREFACE + first.serialize() + b"".join(f.serialize() for f in flood)
    assert server.receive_data(wire) == []  # no event, no error: all of it is buffered
    scanner = FrameScanner(60 * 1024, server=True)
    with pytest.raises(HeaderBlockTooLarge):
        for i in range(0, len(wire), 1000):
            scanner.feed(wire[i : i + 1000])
    # GOAWAY is lifted out of the stream, split anywhere, and the rest passes unchanged.
    scanner = FrameScanner(60 * 1024, server=False)
    stream = HeadersFrame(1, data=b"\x82", flags=["END_HEADERS"]).serialize() + goaway_frame(7, 0)
    out, goaways = b"", []
    for i in range(len(stream)):
        data, found = scanner.feed(stream[i : i + 1])
        out += data
        goaways += found
    assert out == stream[: -len(goaway_frame(7, 0))] and len(goaways) == 1


def test_continuation_flood_and_header_limits(start_proxy, tmp_path, h2_codec, upstream):
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, upstream.address)
    baseline = proxy.rss_kib()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        first = HeadersFrame(1, data=b"\x82", flags=["END_STREAM"])
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + first.serialize())
        frame = ContinuationFrame(1, data=b"\x00" * 16384).serialize()
        reply = b""
        try:
            for _ in range(400):  # 6.5 MB of a header block that never ends
                sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    goaway = reply.find(b"\x07\x00\x00\x00\x00\x00")  # GOAWAY frame type, flags, stream 0
    assert goaway >= 0 and reply[goaway + 10 : goaway + 14] == b"\x00\x00\x00\x0b"
    assert proxy.rss_kib() - baseline < 8 * 1024
    # A decoded header list over the limits is answered 431 on its stream only.
    client = H2Client(port)
    sid = client.request("/many", headers=[(f"x-h{i}", "v") for i in range(150)])
    ok = client.request("/fine")
    too_many, fine = client.wait([sid, ok])
    assert too_many["status"] == 431 and fine["status"] == 200
    client.close()


def test_h2load_smoke(start_proxy, tmp_path, h2_codec, upstream):
    require_capability(
        "h2load (nghttp2-client; make test installs it)", shutil.which("h2load") is not None
    )
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, upstream.address)
    run = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"http://127.0.0.1:{port}/h"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "2000 succeeded, 0 failed, 0 errored" in run.stdout, run.stdout
    assert "status codes: 2000 2xx" in run.stdout, run.stdout
    stats = proxy.wait_for(lambda s: s["requests"] == 2000)
    assert stats["requests"] == 2000 and stats["responses"]["2xx"] == 2000


def test_upload_backpressure_crosses_to_a_slow_h1_upstream(start_proxy, tmp_path, h2_codec):
    """A slow app reading an HTTP/2 upload: the proxy holds about a window, not the body."""
    received = []
    release = threading.Event()

    def slow_app(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        release.wait(10)
        total = 0
        while total < 50 * 1024 * 1024:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
        received.append(total)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    from conftest import ThreadedServer

    app = ThreadedServer(slow_app)
    # A small fixed receive buffer on the app side, so the kernel holds little of the upload.
    app.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    proxy, port = _proxy(start_proxy, tmp_path, h2_codec, app.address)
    baseline = proxy.rss_kib()
    client = H2Client(port)
    body = b"u" * (50 * 1024 * 1024)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        sid,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
            (b":path", b"/u"),
            (b"content-length", b"%d" % len(body)),
        ],
    )
    client.responses[sid] = {"status": None, "body": bytearray(), "done": False, "reset": None,
                             "headers": None, "trailers": None}  # fmt: skip
    client.flush()
    sent = 0
    client.sock.settimeout(0.5)
    # Without the app reading, the client gets about one window's worth of credit.
    while True:
        window = client.conn.local_flow_control_window(sid)
        if window:
            size = min(window, 16384)
            client.conn.send_data(sid, body[sent : sent + size])
            sent += size
            client.flush()
            continue
        try:
            client.read_once()
        except TimeoutError:
            break
    # What the kernel buffers on the proxy→app socket, plus the watermark and windows: not 50 MB.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        kernel = int(f.read().split()[2])
    assert sent < kernel + 2 * 1024 * 1024, (sent, kernel)
    release.set()
    client.sock.settimeout(10)
    client.send_body(sid, body[sent:], end=True)
    (response,) = client.wait([sid])
    assert response["status"] == 200 and received == [len(body)]
    assert proxy.rss_kib() - baseline < 24 * 1024
    client.close()
    app.close()


def test_without_the_native_module_http2_runs_on_hyper_h2(
    start_proxy, tmp_path, h2_upstream, monkeypatch
):
    # The fallback: asked for native, not available (not built, or disabled) -> h2, and said so.
    monkeypatch.setenv("PYPROXY_DISABLE_NATIVE", "1")
    proxy, port = _proxy(start_proxy, tmp_path, "native", h2_upstream.address, "http2")
    assert json.loads(http_get(proxy.admin + "/server_info")[1])["http2_codec"] == {"main": "h2"}
    url = f"http://127.0.0.1:{port}/x"
    assert curl("--http2-prior-knowledge", url).stdout == b"ok:/x:h2up"
