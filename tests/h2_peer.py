"""Real HTTP/2 peers for tests, built on h2 over blocking sockets: a threaded h2c server and a client."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings
from servers import ThreadedServer


class H2Upstream(ThreadedServer):
    """Threaded h2c (prior knowledge) server on loopback. Paths:

    /echo          200, JSON: method, path, authority, headers, body length + sha256, trailers
    /trailers      200, body "data", then trailers grpc-status: 0, grpc-message: fine
    /big?mb=N      N MiB body, sent as the window allows
    /slow?ms=N     waits, then 200 "slow"
    /reset         RST_STREAM INTERNAL_ERROR before any response
    /reset-after   200 head and 1000 bytes, then RST_STREAM
    /hang          never answers (the test watches for the proxy's RST_STREAM in .resets)
    /status?raw=S  a head with ":status: S" as given (h2 sends any bytes), body "s"
    anything else  200 "ok:<path>:<name>"
    """

    def __init__(self, name: str = "h2up", max_streams: int = 100) -> None:
        self.name = name
        self.max_streams = max_streams
        self.requests: list[dict] = []
        self.resets: list[tuple[int, int]] = []  # (stream id, error code) sent by the proxy
        # Every RST_STREAM frame's stream id as it arrived, even on a stream h2 considers closed
        # (h2 reports no event for those).
        self.rst_frames: list[int] = []
        # DATA frames that carried nothing but END_STREAM (a body's end sent apart from it).
        self.empty_end_frames = 0
        self.peak_streams = 0
        self._active = 0
        self._lock = threading.Lock()
        super().__init__(lambda conn: _ServerConn(self, conn).run(), nodelay=True)

    def stream_started(self) -> None:
        with self._lock:
            self._active += 1
            self.peak_streams = max(self.peak_streams, self._active)

    def stream_stopped(self) -> None:
        with self._lock:
            self._active -= 1


class _ServerConn:
    def __init__(self, server: H2Upstream, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.lock = threading.RLock()
        self.window = threading.Condition(self.lock)
        self.streams: dict[int, dict] = {}
        self.closed = False
        self.inbound = bytearray()
        self.preface_left = 24

    def count_frames(self, data: bytes) -> None:
        """Read frame headers off the raw bytes, to see frames h2 swallows."""
        buf = self.inbound
        buf += data
        if self.preface_left:
            cut = min(self.preface_left, len(buf))
            del buf[:cut]
            self.preface_left -= cut
        while len(buf) >= 9:
            size = 9 + int.from_bytes(buf[:3], "big")
            if len(buf) < size:
                return
            if buf[3] == 0x3:  # RST_STREAM
                self.server.rst_frames.append(int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF)
            elif buf[3] == 0x0 and size == 9 and buf[4] & 0x1:  # empty DATA, END_STREAM
                self.server.empty_end_frames += 1
            del buf[:size]

    def run(self) -> None:
        try:
            with self.lock:
                self.conn.local_settings = Settings(
                    client=False,
                    initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams},
                )
                self.conn.initiate_connection()
                self.flush()
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                with self.lock:
                    self.count_frames(data)
                    for event in self.conn.receive_data(data):
                        self.handle(event)
                    self.flush()
                    self.window.notify_all()
        except (OSError, ConnectionError):
            return
        except BaseException as exc:
            self.server.errors.append(exc)
        finally:
            with self.lock:
                self.closed = True
                self.window.notify_all()
            self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def handle(self, event) -> None:
        if isinstance(event, RequestReceived):
            self.server.stream_started()
            self.streams[event.stream_id] = {
                "headers": event.headers,
                "body": bytearray(),
                "trailers": None,
                "reset": False,
            }
        elif isinstance(event, DataReceived):
            state = self.streams.get(event.stream_id)
            if state is not None:
                state["body"] += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            self.streams[event.stream_id]["trailers"] = event.headers
        elif isinstance(event, StreamEnded):
            state = self.streams.get(event.stream_id)
            if state is not None:
                threading.Thread(
                    target=self.respond, args=(event.stream_id, state), daemon=True
                ).start()
        elif isinstance(event, StreamReset):
            self.server.resets.append((event.stream_id, event.error_code))
            state = self.streams.pop(event.stream_id, None)
            if state is not None:
                state["reset"] = True
                self.server.stream_stopped()

    # ---- responses (one thread per stream; the connection is shared under the lock) ----

    def send_headers(self, sid: int, headers, end: bool = False) -> None:
        with self.lock:
            self.conn.send_headers(sid, headers, end_stream=end)
            self.flush()

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        with self.lock:
            while True:
                if self.closed or self.streams.get(sid) is None:
                    return
                window = self.conn.local_flow_control_window(sid)
                size = min(window, self.conn.max_outbound_frame_size, len(view))
                if size > 0 or not view:
                    last = size == len(view)
                    self.conn.send_data(sid, view[:size].tobytes(), end_stream=end and last)
                    self.flush()
                    view = view[size:]
                    if last:
                        return
                else:
                    self.window.wait(1.0)

    def respond(self, sid: int, state: dict) -> None:
        try:
            self._respond(sid, state)
        except (StreamClosedError, OSError):
            pass
        finally:
            with self.lock:
                if self.streams.pop(sid, None) is not None:
                    self.server.stream_stopped()

    def _respond(self, sid: int, state: dict) -> None:
        headers = dict(state["headers"])
        target = headers[b":path"].decode()
        path, _, query = target.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        self.server.requests.append(
            {"path": path, "headers": [(n.decode(), v.decode()) for n, v in state["headers"]]}
        )
        ok = [(b":status", b"200")]
        if path == "/echo":
            body = bytes(state["body"])
            info = {
                "method": headers[b":method"].decode(),
                "path": target,
                "authority": headers.get(b":authority", b"").decode(),
                "headers": [[n.decode(), v.decode()] for n, v in state["headers"]],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "trailers": [[n.decode(), v.decode()] for n, v in state["trailers"] or []],
                "server": self.server.name,
            }
            payload = json.dumps(info).encode()
            self.send_headers(sid, ok + [(b"content-type", b"application/json")])
            self.send_data(sid, payload, end=True)
        elif path == "/trailers":
            self.send_headers(sid, ok + [(b"content-type", b"application/grpc")])
            self.send_data(sid, b"data")
            self.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"fine")], end=True)
        elif path == "/big":
            size = int(params.get("mb", "1")) * 1024 * 1024
            self.send_headers(sid, ok + [(b"content-length", str(size).encode())])
            chunk = b"B" * 65536
            for i in range(size // len(chunk)):
                self.send_data(sid, chunk, end=i == size // len(chunk) - 1)
        elif path == "/slow":
            time.sleep(int(params.get("ms", "100")) / 1000)
            self.send_headers(sid, ok)
            self.send_data(sid, b"slow", end=True)
        elif path == "/reset":
            with self.lock:
                self.conn.reset_stream(sid, 2)
                self.flush()
        elif path == "/reset-after":
            self.send_headers(sid, ok)
            self.send_data(sid, b"r" * 1000)
            time.sleep(0.1)
            with self.lock:
                self.conn.reset_stream(sid, 2)
                self.flush()
        elif path == "/status":
            self.send_headers(sid, [(b":status", params.get("raw", "").encode())])
            self.send_data(sid, b"s", end=True)
        elif path == "/hang":
            deadline = time.monotonic() + 10
            while not state["reset"] and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            self.send_headers(sid, ok)
            self.send_data(sid, f"ok:{path}:{self.server.name}".encode(), end=True)


class H2Client:
    """A blocking h2c client over one connection; responses are gathered per stream."""

    def __init__(self, port: int, window: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if window is not None:
            self.conn.local_settings = Settings(
                client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.conn.initiate_connection()
        self.responses: dict[int, dict] = {}
        self.terminated: ConnectionTerminated | None = None
        self.eof = False
        self.auto_ack = True
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: list | None = None,
        body: bytes | None = None,
        trailers: list | None = None,
        authority: str = "test.local",
        flush: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        pseudo = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        extra = [(n.encode(), v.encode()) for n, v in headers or []]
        ends = body is None and trailers is None
        self.conn.send_headers(sid, pseudo + extra, end_stream=ends)
        self.responses[sid] = {
            "status": None,
            "headers": None,
            "body": bytearray(),
            "trailers": None,
            "done": False,
            "reset": None,
        }
        if body is not None:
            self.send_body(sid, body, end=trailers is None)
        if trailers is not None:
            self.conn.send_headers(
                sid, [(n.encode(), v.encode()) for n, v in trailers], end_stream=True
            )
        if flush:
            self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while True:
            window = self.conn.local_flow_control_window(sid)
            size = min(window, self.conn.max_outbound_frame_size, len(view))
            if size > 0 or not view:
                last = size == len(view)
                self.conn.send_data(sid, view[:size].tobytes(), end_stream=end and last)
                self.flush()
                view = view[size:]
                if last:
                    return
            else:
                self.read_once()

    def read_once(self) -> list:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return []
        events = self.conn.receive_data(data)
        for event in events:
            state = self.responses.get(getattr(event, "stream_id", 0))
            if isinstance(event, ResponseReceived):
                state["headers"] = event.headers
                state["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, DataReceived):
                state["body"] += event.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, TrailersReceived):
                state["trailers"] = event.headers
            elif isinstance(event, StreamEnded):
                state["done"] = True
            elif isinstance(event, StreamReset):
                if state is not None:
                    state["reset"] = event.error_code
                    state["done"] = True
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event
            elif isinstance(event, WindowUpdated):
                pass
        self.flush()
        return events

    def wait(self, sids, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not all(self.responses[s]["done"] for s in sids):
            if self.eof or self.terminated is not None or time.monotonic() > deadline:
                break
            self.read_once()
        return [self.responses[s] for s in sids]

    def close(self) -> None:
        self.sock.close()
