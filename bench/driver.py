"""The built-in load driver: exact one-outstanding-request exchanges over TCP, HTTP/1.1 and gRPC.

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
PROTOCOLS = ("tcp", "http", "grpc")


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


EXCHANGERS: dict[str, Callable[[str, int], Exchanger]] = {
    "tcp": TcpExchanger,
    "http": HttpExchanger,
    "grpc": GrpcExchanger,
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
