"""Whole HTTP/1 messages: the general path's shortcut and the native lane, through a real pyproxy.

The upstream here answers each request with one write, the way most app
servers do, so the native lane (pyproxy/http/native_lane.py) can carry it once
the general path has paired the connections; some paths answer in ways it
must not (pieces, chunked, close, silence), and then the general path takes
over mid-request. Every test checks what the client got, what the upstream
got, and the `express_requests` counter that says which requests C carried.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from conftest import ThreadedServer, start_listener

EXAMPLES = Path(__file__).resolve().parent.parent / "filters" / "wasm_examples"

OK = b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"


class RawUpstream:
    """Reads whole requests; answers by path; keeps each request's bytes as received."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.server = ThreadedServer(self._serve, nodelay=True)
        self.address = self.server.address

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buf) < length:
                buf += conn.recv(65536)
            body, buf = buf[:length], buf[length:]
            with self.lock:
                self.requests.append(head + b"\r\n\r\n" + body)
            path = head.split(b" ")[1].partition(b"?")[0]
            if not self._answer(conn, path, body):
                return

    def _answer(self, conn: socket.socket, path: bytes, body: bytes) -> bool:
        if path == b"/pieces":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npie")
            time.sleep(0.05)
            conn.sendall(b"ces")
        elif path == b"/chunked":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
        elif path == b"/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye")
            return False
        elif path == b"/vanish":
            return False  # closes without an answer
        elif path == b"/cut":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ncut")
            time.sleep(0.05)
            return False  # closes mid-body
        elif path == b"/both-framings":
            # RFC 9112 §6.3 (3): framed both ways, so nobody can tell where it ends.
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
        elif path == b"/slow":
            time.sleep(0.8)
            conn.sendall(OK % (4, b"slow"))
        elif path == b"/echo":
            conn.sendall(OK % (len(body), body))
        elif path == b"/204":
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        else:
            answer = b"ok:" + path
            conn.sendall(OK % (len(answer), answer))
        return True


def _listener(start_proxy, tmp_path, upstream: RawUpstream, body: str = ""):
    return start_listener(start_proxy, tmp_path, upstream.address, body)


class Client:
    """One kept-alive downstream connection; reads Content-Length or bodiless responses."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sent = 0
        self.unread = b""  # bytes of the next responses (pipelined answers can share a read)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"closed after {self.unread!r}"
        self.unread += chunk

    def response(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.unread:
            self._fill()
        head, _, rest = self.unread.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if head.startswith(b"HTTP/1.1 204"):
            length = 0
        if b"transfer-encoding: chunked" in head.lower():
            while b"0\r\n\r\n" not in rest:
                self._fill()
                rest = self.unread.partition(b"\r\n\r\n")[2]
            length = rest.index(b"0\r\n\r\n") + 5
        while len(rest) < length:
            self._fill()
            rest = self.unread.partition(b"\r\n\r\n")[2]
        self.unread = rest[length:]
        return head, rest[:length]

    def get(self, path: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
        self.send(b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\n" + extra + b"\r\n")
        return self.response()

    def close(self) -> None:
        self.sock.close()


def test_kept_alive_requests_ride_the_native_lane(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = _listener(start_proxy, tmp_path, upstream)
    client = Client(port)
    for i in range(20):
        head, body = client.get(b"/r%d" % i)
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b"ok:/r%d" % i
        assert b"connection" not in head.lower()  # the upstream's hop-by-hop line was cut
    stats = proxy.wait_for(lambda s: s["requests"] == 20)
    # The first request needed a connect (general path); the pooled connection carried the rest.
    assert stats["express_requests"] == 19, stats
    assert stats["responses"]["2xx"] == 20 and stats["flags"] == {}
    assert stats["duration"]["count"] == 20
    assert stats["stages"]["parse"]["events"] >= 38  # the scans are on the clock
    assert upstream.server.connections == 1
    client.close()


def test_whole_messages_go_as_received_less_hop_by_hop(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = _listener(start_proxy, tmp_path, upstream)
    client = Client(port)
    client.get(b"/warm")
    request = (
        b"POST /echo?x=1 HTTP/1.1\r\nHost: svc\r\nX-Mixed-Case:  kept as is \r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhello"
    )
    client.send(request)
    head, body = client.response()
    assert body == b"hello"
    assert upstream.requests[-1] == (
        b"POST /echo?x=1 HTTP/1.1\r\nHost: svc\r\nX-Mixed-Case:  kept as is \r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    head, body = client.get(b"/204")
    assert head.startswith(b"HTTP/1.1 204") and b"X-A: 1" in head and body == b""
    assert proxy.wait_for(lambda s: s["express_requests"] == 2)["express_requests"] == 2
    client.close()


def test_anything_else_continues_on_the_general_path(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = _listener(start_proxy, tmp_path, upstream)
    client = Client(port)
    client.get(b"/warm")
    head, body = client.get(b"/pieces")  # the response arrives in two reads
    assert body == b"pieces"
    head, body = client.get(b"/chunked")
    assert b"chunked" in head.lower() and body.startswith(b"3\r\nabc\r\n")
    head, body = client.get(b"/close")  # the upstream closes: the client stays kept alive
    assert body == b"bye" and b"close" not in head.lower()
    head, body = client.get(b"/after")  # a new upstream connection: the general path
    assert body == b"ok:/after"
    assert client.get(b"/pooled")[1] == b"ok:/pooled"
    # A named connection option: the head is rewritten, X-Drop never reaches the upstream.
    head, body = client.get(b"/named", b"Connection: X-Drop\r\nX-Drop: 1\r\n")
    assert body == b"ok:/named" and b"x-drop" not in upstream.requests[-1].lower()
    stats = proxy.wait_for(lambda s: s["requests"] == 7)
    assert stats["responses"]["2xx"] == 7 and stats["flags"] == {}
    # Only /pooled took the express lane end to end.
    assert stats["express_requests"] == 1, stats
    client.close()


def test_upstream_gone_on_a_pooled_connection_is_retried(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = _listener(start_proxy, tmp_path, upstream)
    client = Client(port)
    client.get(b"/warm")
    # The app closes the pooled connection without answering: the one safe retry, on a new one.
    client.send(b"GET /vanish HTTP/1.1\r\nHost: svc\r\n\r\n")
    client.send(b"")
    head, _ = client.response()
    # The retry reaches /vanish again, which closes again: a 503 with the reset flag.
    assert head.startswith(b"HTTP/1.1 503"), head
    head, body = client.get(b"/next")
    assert body == b"ok:/next"
    stats = proxy.wait_for(lambda s: s["requests"] == 3)
    assert sum(1 for r in upstream.requests if b"/vanish" in r) == 2  # tried, retried once
    assert stats["flags"].get("UC") == 1, stats
    client.close()


def test_route_timeout_fires_for_a_paired_request(start_proxy, tmp_path):
    upstream = RawUpstream()
    routes = "    routes:\n      - match: {prefix: /}\n        timeout: 300ms\n"
    proxy, port = _listener(start_proxy, tmp_path, upstream, routes)
    client = Client(port)
    client.get(b"/warm")
    started = time.monotonic()
    head, _ = client.get(b"/slow")
    elapsed = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 504"), head
    assert 0.3 <= elapsed < 0.7, elapsed
    stats = proxy.wait_for(lambda s: s["flags"].get("UT") == 1)
    assert stats["flags"] == {"UT": 1}
    client.close()


def test_pipelined_and_more_data_leave_the_native_lane(start_proxy, tmp_path):
    upstream = RawUpstream()
    proxy, port = _listener(start_proxy, tmp_path, upstream)
    client = Client(port)
    client.get(b"/warm")
    client.send(b"GET /p1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /p2 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert client.response()[1] == b"ok:/p1"
    assert client.response()[1] == b"ok:/p2"
    # A second request sent while the first (slow) one is on the express lane.
    client.send(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
    time.sleep(0.1)
    client.send(b"GET /p3 HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert client.response()[1] == b"slow"
    assert client.response()[1] == b"ok:/p3"
    stats = proxy.wait_for(lambda s: s["requests"] == 5)
    assert stats["responses"]["2xx"] == 5 and stats["flags"] == {}
    client.close()


def _filters(*entries: str) -> str:
    return "    filters:\n" + "".join(entries)


LUA_BOTH_WAYS = (
    "      - name: stamp\n        type: lua\n        config:\n          inline_code: |\n"
    "            function envoy_on_request(h)\n              h:headers():add('x-lua', '1')\n"
    "            end\n            function envoy_on_response(h)\n"
    "              h:headers():add('x-lua-response', h:headers():get(':status'))\n            end\n"
)


def test_header_only_filters_run_on_whole_messages(start_proxy, tmp_path):
    upstream = RawUpstream()
    wasm = f"      - name: headers\n        type: wasm\n        config:\n          wasm_file: {EXAMPLES / 'headers.wat'}\n"
    proxy, port = _listener(start_proxy, tmp_path, upstream, _filters(LUA_BOTH_WAYS, wasm))
    client = Client(port)
    for i in range(4):
        head, body = client.get(b"/f%d" % i, b"X-Wasm-Remove: 1\r\nX-Wasm-Replace: a\r\n")
        assert body == b"ok:/f%d" % i
        lowered = head.lower()
        assert b"x-lua-response: 200" in lowered and b"x-wasm-response: hello" in lowered
        assert lowered.count(b"content-length: %d" % len(body)) == 1
        sent = upstream.requests[-1].lower()
        assert b"x-lua: 1" in sent and b"x-wasm-added: yes" in sent
        assert b"x-wasm-replace: replaced" in sent and b"x-wasm-remove" not in sent
    stats = proxy.wait_for(lambda s: s["requests"] == 4)
    # Filters of heads only ride in the C pair: all but the first request, which paired it.
    assert stats["express_requests"] == stats["native_requests"] == 3, stats
    assert stats["stages"]["filter:stamp"]["events"] >= 8  # request and response hooks, timed
    assert stats["stages"]["filter:headers"]["ns"] > 0
    client.close()


def test_filters_that_answer_or_wait(start_proxy, tmp_path):
    upstream = RawUpstream()
    fault = (
        "      - name: fault\n        type: fault\n        config:\n"
        "          abort: {percentage: 100, header_abort: true}\n"
        "          delay: {header_delay: true}\n"
    )
    proxy, port = _listener(start_proxy, tmp_path, upstream, _filters(fault))
    client = Client(port)
    client.get(b"/warm")
    before = len(upstream.requests)
    head, _ = client.get(b"/abort", b"x-envoy-fault-abort-request: 418\r\n")
    assert head.startswith(b"HTTP/1.1 418"), head
    assert len(upstream.requests) == before  # answered before anything went upstream
    started = time.monotonic()
    head, body = client.get(b"/delayed", b"x-envoy-fault-delay-request: 150\r\n")
    assert body == b"ok:/delayed" and time.monotonic() - started >= 0.14
    assert client.get(b"/plain")[1] == b"ok:/plain"
    stats = proxy.wait_for(lambda s: s["requests"] == 4)
    assert stats["flags"] == {"FI": 1}, stats
    counters = stats["filters"]["fault"]
    assert counters["aborts_injected"] == 1 and counters["delays_injected"] == 1
    # The abort and the delay are taken from the C pair by the general path; /plain stays in C.
    assert stats["express_requests"] == stats["native_requests"] == 1, stats
    client.close()


def test_filters_that_read_bodies_pair_too(start_proxy, tmp_path):
    """The pair runs body filters over whole bodies (test_native_lane_bodies.py has the cases
    it hands over)."""
    upstream = RawUpstream()
    tap = f"      - name: tap\n        type: tap\n        config:\n          path: {tmp_path / 'tap.jsonl'}\n"
    proxy, port = _listener(start_proxy, tmp_path, upstream, _filters(tap))
    client = Client(port)
    for _ in range(3):
        assert client.get(b"/t")[1] == b"ok:/t"
    assert proxy.wait_for(lambda s: s["requests"] == 3)["express_requests"] == 2
    client.close()
