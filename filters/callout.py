"""Calls a filter program makes to a configured cluster: HTTP (Proxy-Wasm `proxy_http_call`, Lua
`httpCall`), one HTTP/1.1 request on its own connection, and unary gRPC (`proxy_grpc_call`), one
HTTP/2 stream on its own connection; each bounded in time and in size."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11

from pyproxy.codec import grpc
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


# ---- gRPC calls (Proxy-Wasm `proxy_grpc_call`) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class GrpcResult:
    """A unary call's outcome: its gRPC status (OK, or why it failed) and what came back."""

    status: int
    message: bytes  # grpc-message, or why the call failed
    initial_metadata: list[tuple[bytes, bytes]]
    response: bytes | None  # the one response message, when there was one
    trailing_metadata: list[tuple[bytes, bytes]]


def _failed(status: int, message: str) -> GrpcResult:
    return GrpcResult(status, message.encode(), [], None, [])


async def grpc_call(
    cluster: ClusterConfig,
    path: bytes,
    metadata: list[tuple[bytes, bytes]],
    message: bytes,
    timeout: float,
) -> GrpcResult:
    """One unary gRPC call over HTTP/2 (prior knowledge) to the cluster's first endpoint.
    Never raises for the call's own failures: they come back as a status, as a gRPC client
    sees them (DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL...)."""
    try:
        return await asyncio.wait_for(
            _grpc_exchange(cluster, path, metadata, message, timeout), timeout
        )
    except TimeoutError:
        return _failed(grpc.DEADLINE_EXCEEDED, "deadline exceeded")
    except (OSError, h2.exceptions.H2Error) as exc:
        return _failed(grpc.UNAVAILABLE, str(exc) or type(exc).__name__)
    except grpc.FramingError as exc:
        return _failed(exc.status, str(exc))


async def _grpc_exchange(
    cluster: ClusterConfig,
    path: bytes,
    metadata: list[tuple[bytes, bytes]],
    message: bytes,
    timeout: float,
) -> GrpcResult:
    endpoint = cluster.endpoints[0]
    if endpoint.is_unix:
        reader, writer = await asyncio.open_unix_connection(endpoint.path)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", cluster.name.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))),
            *metadata,
        ]
        conn.send_headers(stream, headers)
        pending = memoryview(grpc.frame(message))
        initial: list[tuple[bytes, bytes]] = []
        trailing: list[tuple[bytes, bytes]] = []
        framer = grpc.MessageFramer(MAX_RESPONSE_BYTES)
        responses: list[bytes] = []
        while True:
            if pending:  # as much as the peer's window allows; the rest on its WINDOW_UPDATE
                size = min(len(pending), conn.local_flow_control_window(stream))
                size = min(size, conn.max_outbound_frame_size)
                if size:
                    conn.send_data(stream, bytes(pending[:size]), end_stream=size == len(pending))
                    pending = pending[size:]
            writer.write(conn.data_to_send())
            data = await reader.read(65536)
            if not data:
                return _failed(grpc.UNAVAILABLE, "upstream closed the connection")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    initial = [(bytes(k), bytes(v)) for k, v in event.headers]
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                    responses.extend(bytes(m.data) for m in framer.feed(event.data))
                elif isinstance(event, h2.events.TrailersReceived):
                    trailing = [(bytes(k), bytes(v)) for k, v in event.headers]
                elif isinstance(event, h2.events.StreamReset):
                    return _failed(grpc.UNAVAILABLE, f"stream reset ({event.error_code})")
                elif isinstance(event, h2.events.StreamEnded):
                    framer.finish()
                    return _grpc_result(initial, responses, trailing)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return _failed(grpc.UNAVAILABLE, "connection closed by the upstream")
    finally:
        writer.close()


def _grpc_result(
    initial: list[tuple[bytes, bytes]], responses: list[bytes], trailing: list[tuple[bytes, bytes]]
) -> GrpcResult:
    status_source = trailing or initial  # a trailers-only answer has its status in the head
    status, text = grpc.status_from_headers(status_source)
    http_status = dict(initial).get(b":status", b"")
    if status is None:
        return _failed(grpc.UNKNOWN, f"no grpc-status (HTTP {http_status.decode()})")
    if status == grpc.OK and len(responses) != 1:
        return _failed(grpc.INTERNAL, f"{len(responses)} response messages to a unary call")
    metadata = [(k, v) for k, v in initial if not k.startswith(b":")]
    trailers = [(k, v) for k, v in trailing if k not in (b"grpc-status", b"grpc-message")]
    return GrpcResult(status, text, metadata, responses[0] if responses else None, trailers)


# ---- gRPC streams (Proxy-Wasm `proxy_grpc_stream`) ------------------------------------------


class GrpcStream:
    """A streaming gRPC call over HTTP/2 (prior knowledge) to the cluster's first endpoint.

    Messages go out as `send` is called (queued until the connection is up, then as the peer's
    window allows); what comes back is handed to `deliver(kind, value)` as it arrives:
    ("initial", metadata pairs), ("message", bytes) for each message, ("trailing", pairs), and
    last ("close", (status, message)); a failed call only closes. `close` half-closes (the
    server may still answer); `cancel` resets the stream and nothing more is delivered."""

    def __init__(self, loop, cluster: ClusterConfig, path: bytes, metadata, deliver) -> None:
        self.cluster = cluster
        self.path = path
        self.metadata = list(metadata)
        self.deliver = deliver
        self.pending = bytearray()
        self.local_closed = False
        self.end_sent = False
        self.done = False
        self.conn: h2.connection.H2Connection | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stream_id = 0
        self.task = loop.create_task(self._run())

    def send(self, message: bytes, end_stream: bool) -> bool:
        """Queue one message (and the end of the request stream); False once half-closed."""
        if self.local_closed or self.done:
            return False
        self.pending += grpc.frame(message)
        self.local_closed = end_stream
        self._flush()
        return True

    def close(self) -> None:
        """Half-close: no more messages from us; the answer still comes."""
        if not self.local_closed:
            self.local_closed = True
            self._flush()

    def cancel(self) -> None:
        """Reset the stream: nothing more is sent or delivered."""
        self.done = True
        conn, writer = self.conn, self.writer
        if conn is not None and writer is not None and not writer.is_closing():
            try:
                conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
                writer.write(conn.data_to_send())
            except h2.exceptions.H2Error:
                pass
        self.task.cancel()

    def _flush(self) -> None:
        conn, writer = self.conn, self.writer
        if conn is None or writer is None or self.done or writer.is_closing():
            return
        stream = self.stream_id
        while self.pending:
            size = min(len(self.pending), conn.local_flow_control_window(stream))
            size = min(size, conn.max_outbound_frame_size)
            if not size:
                break  # the rest on the peer's WINDOW_UPDATE
            last = size == len(self.pending) and self.local_closed
            conn.send_data(stream, bytes(self.pending[:size]), end_stream=last)
            del self.pending[:size]
            self.end_sent = self.end_sent or last
        if not self.pending and self.local_closed and not self.end_sent:
            conn.end_stream(stream)
            self.end_sent = True
        writer.write(conn.data_to_send())

    def _give(self, kind: str, value) -> bool:
        """Deliver one event unless cancelled; False when the stream is over for the guest."""
        if self.done:
            return False
        if kind == "close":
            self.done = True
        self.deliver(kind, value)
        return not self.done

    async def _run(self) -> None:
        try:
            status, message = await self._exchange()
        except (OSError, h2.exceptions.H2Error) as exc:
            status, message = grpc.UNAVAILABLE, str(exc) or type(exc).__name__
        except grpc.FramingError as exc:
            status, message = exc.status, str(exc)
        finally:
            if self.writer is not None:
                self.writer.close()
        self._give("close", (status, message.encode() if isinstance(message, str) else message))

    async def _exchange(self) -> tuple[int, bytes | str]:
        endpoint = self.cluster.endpoints[0]
        if endpoint.is_unix:
            reader, self.writer = await asyncio.open_unix_connection(endpoint.path)
        else:
            reader, self.writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.initiate_connection()
        self.stream_id = stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", self.path),
                (b":authority", self.cluster.name.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *self.metadata,
            ],
        )
        self.conn = conn
        self._flush()
        framer = grpc.MessageFramer(MAX_RESPONSE_BYTES)
        initial: list[tuple[bytes, bytes]] = []
        while True:
            data = await reader.read(65536)
            if not data:
                return grpc.UNAVAILABLE, "upstream closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    initial = [(bytes(k), bytes(v)) for k, v in event.headers]
                    if not any(k == b"grpc-status" for k, _ in initial):  # not trailers-only
                        pairs = [(k, v) for k, v in initial if not k.startswith(b":")]
                        if not self._give("initial", pairs):
                            return grpc.CANCELLED, ""
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                    for m in framer.feed(event.data):
                        if not self._give("message", bytes(m.data)):
                            return grpc.CANCELLED, ""
                elif isinstance(event, h2.events.TrailersReceived):
                    trailing = [(bytes(k), bytes(v)) for k, v in event.headers]
                    status, text = grpc.status_from_headers(trailing)
                    rest = [
                        (k, v) for k, v in trailing if k not in (b"grpc-status", b"grpc-message")
                    ]
                    if not self._give("trailing", rest):
                        return grpc.CANCELLED, ""
                    framer.finish()
                    if status is None:
                        return grpc.UNKNOWN, "no grpc-status in the trailers"
                    return status, text
                elif isinstance(event, h2.events.StreamEnded):  # trailers-only, or no status
                    framer.finish()
                    status, text = grpc.status_from_headers(initial)
                    if status is None:
                        http_status = dict(initial).get(b":status", b"").decode()
                        return grpc.UNKNOWN, f"no grpc-status (HTTP {http_status})"
                    return status, text
                elif isinstance(event, h2.events.WindowUpdated):
                    self._flush()
                elif isinstance(event, h2.events.StreamReset):
                    return grpc.UNAVAILABLE, f"stream reset ({event.error_code})"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return grpc.UNAVAILABLE, "connection closed by the upstream"
            if not self.done:
                self.writer.write(conn.data_to_send())
