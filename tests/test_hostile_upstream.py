"""An upstream that answers badly: the request it got is never sent a second time."""

from __future__ import annotations

import socket

import pytest
from conftest import ThreadedServer, http_get, start_listener

# RFC 9112 §6.3 (3): both framings in one response; the proxy cannot know where it ends.
_BOTH_FRAMINGS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)


class _CountingUpstream(ThreadedServer):
    """Answers /both-framings with a response framed both ways, anything else with 200 "ok"."""

    def __init__(self) -> None:
        self.request_lines: list[bytes] = []
        super().__init__(self._serve)

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            self.request_lines.append(line)
            if b"/both-framings" in line:
                conn.sendall(_BOTH_FRAMINGS)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_protocol_error_after_response_bytes_is_answered_502_once_never_retried(
    start_proxy, tmp_path, method
):
    upstream = _CountingUpstream()
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address)
    assert http_get(f"http://127.0.0.1:{port}/warm")[0] == 200  # the pool now has a connection
    status, _ = http_get(f"http://127.0.0.1:{port}/both-framings", method=method)
    assert status == 502
    sent = [line for line in upstream.request_lines if b"/both-framings" in line]
    assert sent == [method.encode() + b" /both-framings HTTP/1.1"]
    snap = proxy.wait_for(lambda s: s["flags"].get("UPE") == 1)
    assert snap["flags"].get("UPE") == 1, snap
    assert http_get(f"http://127.0.0.1:{port}/after")[0] == 200
    upstream.close()
