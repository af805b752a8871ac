"""HTTP calls a filter program makes to a configured cluster (Proxy-Wasm `proxy_http_call`, Lua
`httpCall`): one HTTP/1.1 request on its own connection, bounded in time and in size."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11

from pyproxy.config import ClusterConfig

MAX_RESPONSE_BYTES = 1024 * 1024  # a callout's answer is held whole for the program: cap it


@dataclass(frozen=True, slots=True)
class CallResult:
    headers: list[tuple[bytes, bytes]]  # `:status` first, then the response's headers
    body: bytes
    trailers: list[tuple[bytes, bytes]]


class CalloutError(Exception):
    """The call could not be made or answered (connect failure, reset, timeout, oversize)."""


def split_request(
    pairs: list[tuple[bytes, bytes]],
) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, headers with host) from Envoy-style pairs; `:method` and `:path` required."""
    pseudo = {k: v for k, v in pairs if k.startswith(b":")}
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    if not method or not path:
        raise ValueError("a call needs :method and :path headers")
    headers = [(k, v) for k, v in pairs if not k.startswith(b":")]
    if b":authority" in pseudo and not any(k.lower() == b"host" for k, _ in headers):
        headers.insert(0, (b"host", pseudo[b":authority"]))
    return method, path, headers


async def http_call(
    cluster: ClusterConfig, pairs: list[tuple[bytes, bytes]], body: bytes, timeout: float
) -> CallResult:
    """Send the request to the cluster's first endpoint; raises CalloutError (or ValueError for a bad request)."""
    method, target, headers = split_request(pairs)
    if not any(k.lower() == b"host" for k, _ in headers):
        headers.insert(0, (b"host", cluster.name.encode()))
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"connection", b"close"))
    try:
        request = h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    try:
        return await asyncio.wait_for(_exchange(cluster, request, body), timeout)
    except TimeoutError:
        raise CalloutError("timeout") from None
    except (OSError, h11.ProtocolError) as exc:
        raise CalloutError(str(exc) or type(exc).__name__) from None


async def _exchange(cluster: ClusterConfig, request: h11.Request, body: bytes) -> CallResult:
    endpoint = cluster.endpoints[0]
    if endpoint.is_unix:
        reader, writer = await asyncio.open_unix_connection(endpoint.path)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        conn = h11.Connection(h11.CLIENT)
        writer.write(
            conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = [(b":status", str(event.status_code).encode())]
                status.extend((k, v) for k, v in event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise CalloutError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(k, v) for k, v in event.headers]
                return CallResult(status, b"".join(chunks), trailers)
            elif isinstance(event, h11.ConnectionClosed):
                raise CalloutError("upstream closed the connection before answering")
    finally:
        writer.close()
