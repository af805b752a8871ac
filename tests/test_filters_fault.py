"""The fault filter through a real proxy: abort rates, measured delays, header faults, the active cap, TCP mode."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest
from conftest import filter_yaml, start_listener
from h2_peer import H2Client


def _proxy(start_proxy, tmp_path, upstream_address: str, fault_config: str, mode: str = "http"):
    return start_listener(
        start_proxy, tmp_path, upstream_address, filter_yaml("fault", fault_config), mode
    )


class Client:
    """Keep-alive requests on one connection, reconnecting when the proxy closed it (local replies)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def get(self, path: str = "/x", headers=None) -> tuple[int, dict]:
        for attempt in range(2):
            try:
                self.conn.request("GET", path, headers=headers or {})
                response = self.conn.getresponse()
                response.read()
                if response.will_close:
                    self.conn.close()
                return response.status, {k.lower(): v for k, v in response.getheaders()}
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def _timed_get(port: int, headers=None) -> tuple[int, float]:
    client = Client(port)
    try:
        start = time.monotonic()
        status, _ = client.get(headers=headers)
        return status, time.monotonic() - start
    finally:
        client.close()


def test_abort_percentage_holds_over_400_requests(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, "{abort: {http_status: 503, percentage: 25}}"
    )
    client = Client(port)
    try:
        statuses = [client.get()[0] for _ in range(400)]
    finally:
        client.close()
    aborted = statuses.count(503)
    assert statuses.count(200) + aborted == 400
    # Binomial(400, 0.25): mean 100, sd 8.7; ±5 sd keeps a false failure below 1e-6.
    assert 57 <= aborted <= 143, aborted
    snap = proxy.listener()
    assert snap["filters"]["fault"]["aborts_injected"] == aborted
    assert snap["flags"].get("FI") == aborted
    assert len(upstream.requests) == 400 - aborted


def test_fixed_delay_is_measured(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, "{delay: {fixed_delay: 250ms, percentage: 100}}"
    )
    timings = [_timed_get(port) for _ in range(3)]
    for status, elapsed in timings:
        assert status == 200
        assert 0.25 <= elapsed < 0.25 + 0.4, timings
    snap = proxy.listener()
    assert snap["filters"]["fault"]["delays_injected"] == 3
    assert snap["filters"]["fault"]["active_faults"] == 0


def test_header_faults_ignored_unless_enabled(start_proxy, tmp_path, upstream):
    asks = {"x-envoy-fault-abort-request": "418", "x-envoy-fault-delay-request": "300"}
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        "{abort: {http_status: 503, percentage: 0}, delay: {fixed_delay: 1s, percentage: 0}}",
    )
    status, elapsed = _timed_get(port, asks)
    assert status == 200 and elapsed < 0.25
    assert proxy.listener()["filters"]["fault"]["aborts_injected"] == 0

    # A second proxy with header faults on.
    enabled, port2 = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        "{abort: {header_abort: true, percentage: 100}, delay: {header_delay: true}}",
    )
    assert _timed_get(port2, {"x-envoy-fault-abort-request": "418"})[0] == 418
    status, elapsed = _timed_get(port2, {"x-envoy-fault-delay-request": "300"})
    assert status == 200 and 0.3 <= elapsed < 0.7
    status, elapsed = _timed_get(port2)  # no header: no fault
    assert status == 200 and elapsed < 0.25
    counters = enabled.listener()["filters"]["fault"]
    assert counters["aborts_injected"] == 1 and counters["delays_injected"] == 1


def test_max_active_faults_overflow_counted(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        "{delay: {fixed_delay: 600ms, percentage: 100}, max_active_faults: 2}",
    )
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        result = _timed_get(port)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.03)  # all five start well inside the first two delays
    for thread in threads:
        thread.join(10)
    assert len(results) == 5 and all(status == 200 for status, _ in results)
    delayed = [elapsed for _, elapsed in results if elapsed >= 0.6]
    assert len(delayed) == 2, results
    counters = proxy.listener()["filters"]["fault"]
    assert counters == {
        "delays_injected": 2,
        "aborts_injected": 0,
        "faults_overflow": 3,
        "active_faults": 0,
    }


def test_tcp_delay_holds_the_connection(start_proxy, tmp_path, echo_server):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        echo_server.address,
        "{delay: {fixed_delay: 300ms, percentage: 100}}",
        mode="tcp",
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(b"hello")
        assert sock.recv(16) == b"hello"
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.8, elapsed
    assert proxy.listener()["filters"]["fault"]["delays_injected"] == 1


def test_tcp_abort_resets(start_proxy, tmp_path, echo_server):
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        echo_server.address,
        "{abort: {http_status: 503, percentage: 100}}",
        mode="tcp",
    )
    for _ in range(3):
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"hello")
                if sock.recv(16) == b"":
                    raise AssertionError("closed with FIN, expected a reset")
    snap = proxy.wait_for(lambda s: s["flags"].get("FI", 0) == 3)
    assert snap["filters"]["fault"]["aborts_injected"] == 3
    assert snap["flags"]["FI"] == 3
    assert echo_server.connections == 0


def test_request_pipelined_behind_a_local_reply_is_answered(start_proxy, tmp_path, upstream):
    """Regression: the fault filter answered the first of two pipelined requests before the codec
    had reported the second as held, so the second was held forever and never answered."""
    _, port = _proxy(
        start_proxy, tmp_path, upstream.address, "{abort: {http_status: 503, percentage: 100}}"
    )
    request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request * 3)
        received = b""
        while received.count(b"HTTP/1.1 503") < 3:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.count(b"HTTP/1.1 503") == 3, received


def _read_until(sock: socket.socket, end: bytes = b"\r\n\r\n") -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("status", [204, 304])
def test_an_abort_with_a_bodiless_status_sends_no_body(start_proxy, tmp_path, upstream, status):
    """Regression: the abort's text went out on a 204/304 as Content-Length and body; the HTTP/1
    codec refused the body, so the exchange never ended and the connection answered no more."""
    proxy, port = _proxy(
        start_proxy,
        tmp_path,
        upstream.address,
        f"{{abort: {{http_status: {status}, percentage: 100}}}}",
    )
    reason = {204: b"No Content", 304: b"Not Modified"}[status]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for method in (b"GET", b"HEAD", b"GET"):
            sock.sendall(method + b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
            # A bare head, nothing after it: no content fields, no body (RFC 9110 §6.4.1, §8.6).
            assert _read_until(sock) == b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(65536) == b""  # nothing after the last head either
    client = H2Client(port)
    try:
        sids = [client.request("/x"), client.request("/x", method="HEAD")]
        for response in client.wait(sids):
            assert response["done"] and response["reset"] is None
            assert response["status"] == status and response["body"] == b""
            assert [name for name, _ in response["headers"]] == [b":status"]
    finally:
        client.close()
    snap = proxy.wait_for(lambda s: s["duration"]["count"] == 5)
    assert snap["flags"] == {"FI": 5}
    assert snap["responses"][f"{status // 100}xx"] == 5 and snap["bytes"]["downstream_tx"] > 0


def test_an_abort_answers_head_with_the_length_and_no_body(start_proxy, tmp_path, upstream):
    proxy, port = _proxy(
        start_proxy, tmp_path, upstream.address, "{abort: {http_status: 503, percentage: 100}}"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        head = _read_until(sock)
        assert head.startswith(b"HTTP/1.1 503 ") and head.endswith(b"\r\n\r\n")
        assert b"content-length: 19\r\n" in head  # what a GET would get (RFC 9110 §9.3.2)
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_until(sock, b"\r\n\r\nfault filter abort\n").startswith(b"HTTP/1.1 503 ")
    assert proxy.wait_for(lambda s: s["duration"]["count"] == 2)["flags"] == {"FI": 2}


def test_an_early_answer_reaches_a_client_still_uploading(start_proxy, tmp_path, upstream):
    """The proxy answers on the head and closes while the body keeps coming: the client's upload
    is not reset (curl, for one, gives up on a reset upload without reading the answer), and the
    whole answer and the end follow; the proxy discards the rest of the body."""
    _, port = _proxy(
        start_proxy, tmp_path, upstream.address, "{abort: {http_status: 503, percentage: 100}}"
    )
    body = b"u" * (16 * 1024 * 1024)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
            failed: list[OSError] = []
            uploader = threading.Thread(target=_upload, args=(sock, body, failed), daemon=True)
            uploader.start()
            uploader.join(10)
            assert not uploader.is_alive() and not failed, failed
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        head, rest = answer.split(b"\r\n\r\n", 1)
        assert b"content-length: %d" % len(rest) in head.lower()
    assert len(upstream.requests) == 0


def _upload(sock: socket.socket, body: bytes, failed: list[OSError]) -> None:
    try:
        sock.sendall(body)
    except OSError as error:
        failed.append(error)
