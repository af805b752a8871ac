"""Admin, Prometheus and health endpoints: a tiny HTTP/1.1 server off the data path."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pyproxy.addresses import Address
from pyproxy.io import sockets

log = logging.getLogger("pyproxy.admin")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, data: object, status: int = 200) -> Response:
        return cls(
            status, json.dumps(data, indent=2, sort_keys=False).encode() + b"\n", "application/json"
        )

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """A 200 whose body is sent with chunked encoding as `chunks` yields (b"" = nothing yet)."""

    chunks: AsyncGenerator[bytes, None]
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[dict[str, list[str]]], Awaitable[Response] | Response]
REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _host_name(host: str) -> str:
    """The name part of a Host header value: "[::1]:15000" -> "::1", "LocalHost:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(mutation: bool, headers: dict[str, list[str]], admin_host: str) -> str | None:
    """Why an admin request must be refused, or None: the one rule against browser pages.

    DNS rebinding makes a page's own name resolve to this host, so its requests carry that
    name in Host: every admin request must name an IP address or localhost. A state change
    must come from here: Host names a loopback address or the admin's own, and Origin is
    absent or that same origin (a cross-site POST carries the attacker's Origin)."""
    hosts = headers.get("host", [])
    if len(hosts) > 1 or (mutation and not hosts):
        return "exactly one Host header is required"
    if not hosts:
        return None  # an HTTP/1.0 tool; a browser always sends Host
    host = hosts[0].strip()
    name = _host_name(host)
    if not mutation:
        if _is_address(name) or _is_loopback(name) or name == admin_host:
            return None
        return f"Host {host!r} is a name, not an address (DNS rebinding?)"
    if not (_is_loopback(name) or (admin_host and name == admin_host)):
        return f"Host {host!r} is neither a loopback address nor the admin address"
    origins = headers.get("origin", [])
    if origins and [o.strip().lower() for o in origins] != ["http://" + host.lower()]:
        return f"Origin {', '.join(origins)!r} is not this admin server"
    return None


def _headers(head: bytes) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers.setdefault(name.strip().lower().decode("latin-1"), []).append(
                value.strip().decode("latin-1")
            )
    return headers


class EndpointServer:
    """Serves a fixed route table: {path: (method, handler)}; anything else is 404 or 405.

    With `guarded` (the admin server: it shows config and taps, and POST routes change state),
    each request is checked by `refusal` first: 403 when refused, counted in `refused`, logged.
    `admin_host` is the address the server is bound to, unless a wildcard."""

    def __init__(
        self, routes: dict[str, tuple[str, Handler]], guarded: bool = False, admin_host: str = ""
    ) -> None:
        self.routes = routes
        self.guarded = guarded
        self.admin_host = admin_host.lower()
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, address: Address) -> None:
        sock = sockets.listen(address, reuse_port=False, backlog=128)
        self._server = await asyncio.start_server(self._serve, sock=sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._respond(reader)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            response = Response.text("bad request\n", 400)
        except Exception:  # an endpoint bug must not take the admin server down
            log.exception("admin handler failed")
            response = Response.text("internal error\n", 500)
        if isinstance(response, StreamResponse):
            await _stream(reader, writer, response)
            return
        head = (
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + response.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Response | StreamResponse:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        if len(head) > MAX_HEAD:
            return Response.text("request head too large\n", 431)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response.text("malformed request line\n", 400)
        method, target = parts[0], urlsplit(parts[1])
        route = self.routes.get(target.path)
        if route is None:
            return Response.text("not found; try: " + " ".join(sorted(self.routes)) + "\n", 404)
        allowed, handler = route
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            return Response.text(f"method not allowed; use {allowed}\n", 405)
        if self.guarded:
            reason = refusal(allowed == "POST", _headers(head), self.admin_host)
            if reason is not None:
                self.refused += 1
                log.warning("admin: refused %s %s: %s", method, target.path, reason)
                return Response.text(f"forbidden: {reason}\n", 403)
        result: Any = handler(parse_qs(target.query))
        if asyncio.iscoroutine(result):
            result = await result
        return result


async def _stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: StreamResponse
) -> None:
    """Chunked body until the iterator ends or the client goes away (noticed on each idle poll)."""
    chunks = response.chunks
    try:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n" % response.content_type.encode()
        )
        await writer.drain()
        async for chunk in chunks:
            if reader.at_eof() or writer.is_closing():
                return
            if chunk:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        await chunks.aclose()
        writer.close()
