"""The hostile-input suite's instruments: an upstream that records every byte it receives, raw
HTTP/1 and HTTP/2 downstreams that send crafted input and report how the proxy answered, and
the check every input goes through (its answer, its counter, nothing at the upstream, a normal
request served after it)."""

from __future__ import annotations

import re
import socket
import threading
import time

from conftest import ProxyProcess, free_port, http_get
from http_peer import HttpUpstream

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class _Recorded:
    """A socket whose received bytes are appended to its upstream's log."""

    def __init__(self, conn: socket.socket, log: RecordingUpstream) -> None:
        self._conn = conn
        self._log = log

    def recv(self, size: int) -> bytes:
        data = self._conn.recv(size)
        self._log.record(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


class RecordingUpstream(HttpUpstream):
    """The h11 test upstream (tests/http_peer.py) that also keeps every raw byte it was sent, so a
    test can tell that a rejected input never reached it, even one h11 itself would refuse."""

    def __init__(self, name: str = "up") -> None:
        self._lock = threading.Lock()
        self.received = bytearray()
        super().__init__(name)

    def record(self, data: bytes) -> None:
        with self._lock:
            self.received += data

    def received_since(self, mark: int) -> bytes:
        with self._lock:
            return bytes(self.received[mark:])

    def _serve(self, conn: socket.socket) -> None:
        super()._serve(_Recorded(conn, self))  # type: ignore[arg-type]


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection, half-close, and read until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(reply: bytes) -> int | None:
    """The status of the first response in ``reply`` (None: no response at all)."""
    match = _STATUS_LINE.match(reply)
    return int(match.group(1)) if match else None


def after_marker(received: bytes, marker: bytes) -> bytes:
    """What the upstream received before ``marker`` (the normal request sent after an input)."""
    return received.split(marker, 1)[0]


class RejectionCheck:
    """One hostile input at a time through a running proxy: its answer, the counter it moves,
    what reached the upstream, and a normal request served after it."""

    def __init__(self, proxy, upstream: RecordingUpstream, port: int) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.port = port
        self.serial = 0

    def rejected(self) -> dict[str, int]:
        return dict(self.proxy.listener().get("rejected", {}))

    def run(self, send, reason: str, valid_path: str | None = None) -> tuple[object, bytes]:
        """``send()`` delivers the input and returns its outcome; returns (outcome, what the
        upstream received meanwhile), after checking the counter and a normal request.
        ``valid_path``: requests the input makes that are valid on their own (a flood's)."""
        before = self.rejected()
        mark = len(self.upstream.received)
        requests_before = len(self.upstream.requests)
        outcome = send()
        self.serial += 1
        path = f"/served-after-{self.serial}"
        status, _ = http_get(f"http://127.0.0.1:{self.port}{path}")
        assert status == 200, f"the proxy stopped serving after the input: {status}"
        reached = after_marker(self.upstream.received_since(mark), f"GET {path} ".encode())
        # No hostile input ever becomes a complete request at the upstream.
        arrived = [r["path"] for r in self.upstream.requests[requests_before:]]
        assert [p for p in arrived if p != valid_path] == [path], arrived
        after = self.rejected()
        expected = dict(before)
        expected[reason] = expected.get(reason, 0) + 1
        assert after == expected, (before, after)
        return outcome, reached


H2_PREFACE_SETTINGS = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One raw HTTP/2 frame (RFC 9113 §4.1), for inputs a conforming client library won't send."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


class RawH2Client:
    """An h2 client that sends what it is told, valid or not, and reports how the proxy answered:
    ("status", code), ("reset", error code) or ("goaway", error code)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.conn.initiate_connection()
        self.timeout = timeout

    def send(self, data: bytes = b"") -> None:
        self.sock.sendall(self.conn.data_to_send() + data)

    def outcome(self, stream_id: int = 1) -> tuple[str, int]:
        """Read until the stream's fate is known. Nothing more is sent meanwhile (not even the
        SETTINGS ack), so a proxy closing after its GOAWAY cannot turn it into a reset."""
        from h2.events import ConnectionTerminated, ResponseReceived, StreamReset

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return ("closed", -1)
            if not data:
                return ("closed", -1)
            for event in self.conn.receive_data(data):
                if isinstance(event, ResponseReceived) and event.stream_id == stream_id:
                    return ("status", int(dict(event.headers)[b":status"]))
                if isinstance(event, StreamReset) and event.stream_id == stream_id:
                    return ("reset", event.error_code)
                if isinstance(event, ConnectionTerminated):
                    return ("goaway", event.error_code)
        return ("timeout", -1)

    def close(self) -> None:
        self.sock.close()


def module_proxy(directory, mode: str, upstream: str, settings: str) -> tuple[ProxyProcess, int]:
    """A proxy shared by a module's cases: one listener `main` (mode, a free port, the upstream)
    with ``settings`` lines under it (indented 4); returns (proxy, port), ready."""
    port = free_port()
    config = directory / "proxy.yaml"
    config.write_text(
        f"listeners:\n  - name: main\n    mode: {mode}\n    address: 127.0.0.1:{port}\n"
        f"    upstream: {upstream}\n{settings}"
    )
    return ProxyProcess(["-c", str(config)]).wait_ready(), port
