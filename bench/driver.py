"""The built-in load driver: exact one-outstanding-request exchanges over TCP, HTTP/1.1, HTTP/2
(h2c) and gRPC.

Each protocol is an `Exchanger`: connect once, then `exchange()` sends one
`size`-byte message and waits for the whole `size`-byte echo. `drive()` runs
exchanges back to back (latency) or paced to a rate (CPU at a known load),
timing each with perf_counter_ns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pyproxy.bench.echo_client import connect

GRPC_METHOD = "/bench.Echo/Unary"
PROTOCOLS = ("tcp", "http", "http2", "grpc")


class Exchanger:
    def __init__(self, address: str, size: int) -> None:
        self.address, self.size = address, size

    def exchange(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TcpExchanger(Exchanger):
    def __init__(self, address: str, size: int) -> None:
        super().__init__(address, size)
        self.sock = connect(address)
        self.payload = b"p" * size
        self.view = memoryview(bytearray(size))

    def exchange(self) -> None:
        self.sock.sendall(self.payload)
        got = 0
        while got < self.size:
            n = self.sock.recv_into(self.view[got:])
            if not n:
                raise ConnectionError(f"EOF after {got} of {self.size} bytes")
            got += n

    def close(self) -> None:
        self.sock.close()


class HttpExchanger(TcpExchanger):
    """POST of `size` bytes on one kept-alive connection; the echo's body must be as long."""

    def __init__(self, address: str, size: int) -> None:
        super().__init__(address, size)
        self.payload = (
            b"POST /echo HTTP/1.1\r\nhost: bench\r\ncontent-length: %d\r\n\r\n" % size + b"p" * size
        )
        self.pending = bytearray()

    def exchange(self, header: bytes = b"") -> None:
        """One round trip; `header` (a full `name: value` line) is added to this request only."""
        if header:
            at = self.payload.index(b"\r\n") + 2
            self.sock.sendall(self.payload[:at] + header + b"\r\n" + self.payload[at:])
        else:
            self.sock.sendall(self.payload)
        buf = self.pending
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(buf[:end]).lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(buf) >= end + 4 + length:
                    if not head.startswith(b"http/1.1 200") or length != self.size:
                        raise ConnectionError(
                            f"unexpected response: {head[:60]!r}, {length} B body"
                        )
                    del buf[: end + 4 + length]
                    return
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF before the whole response")
            buf += chunk


class Http2Exchanger(Exchanger):
    """h2c with prior knowledge, one connection: each exchange is a POST of `size` bytes on a new
    stream, and the echo's 200 must carry as many (hyper-h2 as the client: its own cost is the
    same whichever path it measures)."""

    def __init__(self, address: str, size: int) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        super().__init__(address, size)
        self.sock = connect(address)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.body = b"p" * size

    def request_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"bench"),
                (b":path", b"/echo"), (b"content-length", b"%d" % self.size)]  # fmt: skip

    def check(self, status: bytes | None, body_bytes: int) -> None:
        if status != b"200" or body_bytes != self.size:
            raise ConnectionError(f"unexpected response: status {status!r}, {body_bytes} B body")

    def exchange(self) -> None:
        from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset

        conn = self.conn
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, self.request_headers(), end_stream=not self.body)
        if self.body:
            conn.send_data(sid, self.body, end_stream=True)
        self.sock.sendall(conn.data_to_send())
        status, body_bytes = None, 0
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("EOF before the whole response")
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    body_bytes += len(event.data)
                elif isinstance(event, ResponseReceived) and event.stream_id == sid:
                    status = dict(event.headers).get(b":status")
                elif isinstance(event, StreamReset) and event.stream_id == sid:
                    raise ConnectionError(f"stream reset, error code {event.error_code}")
                elif isinstance(event, StreamEnded) and event.stream_id == sid:
                    out = conn.data_to_send()  # window updates and acks go out with the answer read
                    if out:
                        self.sock.sendall(out)
                    self.check(status, body_bytes)
                    return
            out = conn.data_to_send()
            if out:
                self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()


class GrpcExchanger(Exchanger):
    def __init__(self, address: str, size: int) -> None:
        import grpc

        super().__init__(address, size)
        self.channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self.stub = self.channel.unary_unary(GRPC_METHOD)
        self.payload = b"p" * size

    def exchange(self) -> None:
        if len(self.stub(self.payload, timeout=10)) != self.size:
            raise ConnectionError("gRPC echo of the wrong length")

    def close(self) -> None:
        self.channel.close()


class GrpcFutureExchanger(GrpcExchanger):
    """A call as the validation app's services make theirs (validation_app.call_all):
    ``stub.future`` then ``result()``. grpcio answers a future on its channel's own polling
    thread, which then wakes the waiting one; a blocking call's thread polls for its answer
    itself. A hop between meshed apps is profiled with this client (GRPC_CALLER)."""

    def exchange(self) -> None:
        if len(self.stub.future(self.payload, timeout=10).result()) != self.size:
            raise ConnectionError("gRPC echo of the wrong length")


# the client of a call between two services (an app calling another), where it differs from
# the load's: what a profile's whole hop is driven with
GRPC_CALLER = "grpc-future"

EXCHANGERS: dict[str, Callable[[str, int], Exchanger]] = {
    "tcp": TcpExchanger,
    "http": HttpExchanger,
    "http2": Http2Exchanger,
    "grpc": GrpcExchanger,
    GRPC_CALLER: GrpcFutureExchanger,
}


def _rotate(
    exchangers: Sequence[Exchanger], seconds: float, rate: float | None, warmup: int
) -> list[list[int]]:
    """Nanosecond round trips for `seconds`, taking the exchangers in turn, one at a time:
    back to back, or each one started `rate` times per second."""
    for _ in range(warmup):
        for exchanger in exchangers:
            exchanger.exchange()
    clock = time.perf_counter_ns
    out: list[list[int]] = [[] for _ in exchangers]
    start = time.monotonic()
    deadline = start + seconds
    interval = 1.0 / (rate * len(exchangers)) if rate else 0.0
    next_at = start
    turn = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if interval:
            if now < next_at:
                time.sleep(next_at - now)
            next_at += interval
        t0 = clock()
        exchangers[turn].exchange()
        out[turn].append(clock() - t0)
        turn = (turn + 1) % len(exchangers)
    return out


def drive(
    exchanger: Exchanger, seconds: float, rate: float | None = None, warmup: int = 50
) -> list[int]:
    """Nanosecond round trips for `seconds`: back to back, or started every 1/rate s (never two at once)."""
    return _rotate([exchanger], seconds, rate, warmup)[0]


def drive_paired(
    first: Exchanger, second: Exchanger, seconds: float, rate: float | None = None, warmup: int = 20
) -> tuple[list[int], list[int]]:
    """Round trips alternating between two exchangers, so both see the same machine at the same
    moments (a noisy machine's load changes on a scale of seconds: run one after the other, the
    two would be measured under different loads). Paced, each one is started `rate` times per s."""
    got = _rotate([first, second], seconds, rate, warmup)
    return got[0], got[1]


def wait_ready(protocol: str, address: str, timeout: float = 20.0) -> None:
    """Block until one exchange through `address` succeeds (a proxy and its upstream are up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            exchanger = EXCHANGERS[protocol](address, 1)
            try:
                exchanger.exchange()
                return
            finally:
                exchanger.close()
        except (OSError, ConnectionError, Exception) as exc:  # grpc raises its own RpcError
            if time.monotonic() > deadline:
                raise RuntimeError(f"{protocol} echo via {address} not ready: {exc}") from None
            time.sleep(0.1)
