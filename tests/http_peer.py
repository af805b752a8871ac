"""A real HTTP/1.1 upstream for tests, built on h11: each path is a behaviour the proxy must handle."""

from __future__ import annotations

import json
import socket
import struct
import time

import h11
from servers import ThreadedServer


class HttpUpstream(ThreadedServer):
    """Threaded h11 server on loopback. Paths:

    /echo            200, JSON of what arrived (method, target, headers, body length, sha of body)
    /chunked?n=N     200 chunked, N chunks of 1000 bytes
    /drip?n=N&ms=M   200 chunked, N chunks of 1000 bytes, M ms apart (a slow stream)
    /big?mb=N        200 with N MiB body (content-length)
    /status/CODE     that status, empty body (204/304 framing)
    /slow?ms=N       waits, then 200
    /reset           resets the connection before answering
    /close-after     answers keep-alive, then closes the connection silently (pooled-connection race)
    /upgrade         101 Switching Protocols, then echoes raw bytes
    /trailers        200 chunked "body", trailers x-upstream-trailer: t1 and x-drop-me: 1
                     (every request's trailers are recorded, as requests[i]["trailers"])
    anything else    200 "ok:<path>"
    """

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.requests: list[dict] = []
        self.trailers: list[tuple[str, str]] = []  # the last request's
        super().__init__(self._serve, nodelay=True)

    def _serve(self, conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = self._read_request(conn, h)
                if request is None:
                    return
                keep = self._respond(conn, h, request, body)
                if not keep or h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def _read_request(self, conn, h):
        request, body = None, bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = conn.recv(65536)
                h.receive_data(data)
                if not data and request is None:
                    return None, None
                continue
            if isinstance(event, h11.Request):
                request = event
                for name, value in request.headers:
                    if name == b"expect" and value.lower() == b"100-continue":
                        conn.sendall(h.send(h11.InformationalResponse(status_code=100, headers=[])))
                if request.target.startswith(b"/upgrade"):
                    return request, body
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.trailers = [(n.decode(), v.decode()) for n, v in event.headers]
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, None

    def _send(self, conn, h, status: int, body: bytes = b"", headers=None, chunks=None) -> None:
        headers = list(headers or [])
        if chunks is None and status not in (204, 304):
            headers.append(("content-length", str(len(body))))
        conn.sendall(h.send(h11.Response(status_code=status, headers=headers)))
        if chunks is not None:
            for chunk in chunks:
                conn.sendall(h.send(h11.Data(data=chunk)))
        elif body:
            conn.sendall(h.send(h11.Data(data=body)))
        conn.sendall(h.send(h11.EndOfMessage()))

    def _respond(self, conn, h, request, body) -> bool:
        path, _, query = request.target.decode().partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        self.requests.append(
            {
                "path": path,
                "headers": [(n.decode(), v.decode()) for n, v in request.headers],
                "trailers": self.trailers,
            }
        )
        if path == "/echo":
            import hashlib

            info = {
                "method": request.method.decode(),
                "target": request.target.decode(),
                "headers": [[n.decode(), v.decode()] for n, v in request.headers],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "server": self.name,
            }
            self._send(
                conn, h, 200, json.dumps(info).encode(), [("content-type", "application/json")]
            )
        elif path == "/chunked":
            n = int(params.get("n", "3"))
            self._send(conn, h, 200, chunks=[b"c" * 1000 for _ in range(n)])
        elif path == "/drip":
            chunks = _drip(int(params.get("n", "3")), int(params.get("ms", "100")) / 1000)
            self._send(conn, h, 200, chunks=chunks)
        elif path == "/big":
            size = int(params.get("mb", "1")) * 1024 * 1024
            conn.sendall(
                h.send(h11.Response(status_code=200, headers=[("content-length", str(size))]))
            )
            chunk = b"B" * 65536
            for _ in range(size // len(chunk)):
                conn.sendall(h.send(h11.Data(data=chunk)))
            conn.sendall(h.send(h11.EndOfMessage()))
        elif path.startswith("/status/"):
            self._send(conn, h, int(path.rsplit("/", 1)[1]))
        elif path == "/slow":
            time.sleep(int(params.get("ms", "100")) / 1000)
            self._send(conn, h, 200, b"slow")
        elif path == "/reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif path == "/trailers":
            conn.sendall(h.send(h11.Response(status_code=200, headers=[])))
            conn.sendall(h.send(h11.Data(data=b"body")))
            trailers = [("x-upstream-trailer", "t1"), ("x-drop-me", "1")]
            conn.sendall(h.send(h11.EndOfMessage(headers=trailers)))
        elif path == "/close-after":
            self._send(conn, h, 200, b"closing")
            return False
        elif path == "/upgrade":
            conn.sendall(
                h.send(
                    h11.InformationalResponse(
                        status_code=101, headers=[("connection", "upgrade"), ("upgrade", "echo")]
                    )
                )
            )
            data, _ = h.trailing_data
            if data:
                conn.sendall(data)
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
            return False
        else:
            self._send(conn, h, 200, f"ok:{path}:{self.name}".encode())
        return True


def _drip(n: int, pause: float):
    for _ in range(n):
        time.sleep(pause)
        yield b"d" * 1000
