"""io.Stream driven in-process over real socket pairs on uvloop: what its owner hears (data, EOF,
failure, watermarks), corking, half-close, close after flush, lending the fd, and its accounts."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import listener_block

from pyproxy.counters import (
    DOWNSTREAM_RX,
    DOWNSTREAM_TX,
    IPC,
    READ,
    STAGE_EVENTS,
    STAGE_NS,
)
from pyproxy.io.stream import NOTIFY_EVENTS, Stream

uvloop = pytest.importorskip("uvloop")


class Owner:
    """Records what the stream tells its owner, in order."""

    def __init__(self) -> None:
        self.heard: list[tuple] = []

    def data_received(self, data: bytes) -> None:
        self.heard.append(("data", data))

    def eof_received(self) -> None:
        self.heard.append(("eof",))

    def stream_failed(self, error: OSError) -> None:
        self.heard.append(("failed", type(error)))

    def write_paused(self) -> None:
        self.heard.append(("paused",))

    def write_resumed(self) -> None:
        self.heard.append(("resumed",))

    def data(self) -> bytes:
        return b"".join(event[1] for event in self.heard if event[0] == "data")


def make_stream(loop, timed: bool = False, high_water: int = 256 * 1024):
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    block = listener_block()
    owner = Owner()
    stream = Stream(
        loop, ours, block, owner, timed=timed, read_stage=IPC, write_stage=READ,
        rx_slot=DOWNSTREAM_RX, tx_slot=DOWNSTREAM_TX, high_water=high_water,
    )  # fmt: skip
    return stream, peer, owner, block


async def until(condition, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def read_from(peer: socket.socket, until_bytes: int | None = None) -> bytes:
    """What the peer end receives: `until_bytes` of it, or everything up to the FIN."""
    peer.setblocking(False)
    received = bytearray()
    while until_bytes is None or len(received) < until_bytes:
        try:
            chunk = peer.recv(1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            break
        received += chunk
    return bytes(received)


def run(coroutine_function) -> None:
    uvloop.run(coroutine_function())


def test_reads_reach_the_owner_and_eof_ends_reading_with_accounts():
    async def scenario() -> None:
        stream, peer, owner, block = make_stream(asyncio.get_running_loop(), timed=True)
        stream.resume_reading()
        peer.sendall(b"hello")
        await until(lambda: owner.data() == b"hello")
        peer.shutdown(socket.SHUT_WR)
        await until(lambda: ("eof",) in owner.heard)
        assert not stream.reading
        assert block[DOWNSTREAM_RX] == stream.bytes_in == 5
        assert block[STAGE_EVENTS + IPC] == 2 and block[STAGE_NS + IPC] > 0  # data, then EOF
        assert block[NOTIFY_EVENTS] == 2
        stream.close()
        peer.close()

    run(scenario)


def test_a_paused_stream_hears_nothing_until_resumed():
    async def scenario() -> None:
        stream, peer, owner, _ = make_stream(asyncio.get_running_loop())
        stream.resume_reading()
        stream.pause_reading()
        peer.sendall(b"held")
        await asyncio.sleep(0.05)
        assert owner.heard == []
        stream.resume_reading()
        await until(lambda: owner.data() == b"held")
        stream.close()
        peer.close()

    run(scenario)


def test_corked_writes_leave_in_one_send():
    async def scenario() -> None:
        stream, peer, _, block = make_stream(asyncio.get_running_loop(), timed=True)
        stream.cork()
        for part in (b"head ", b"body ", b"end"):
            stream.write(part)
        assert block[STAGE_EVENTS + READ] == 0  # nothing sent while corked
        stream.uncork()
        assert block[STAGE_EVENTS + READ] == 1
        assert peer.recv(100) == b"head body end"
        assert block[DOWNSTREAM_TX] == stream.bytes_out == 13
        stream.close()
        peer.close()

    run(scenario)


def test_backpressure_pauses_above_the_high_mark_and_resumes_below_the_low_mark():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stream, peer, owner, _ = make_stream(loop, high_water=64 * 1024)
        payload = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers take
        stream.write(payload)
        assert owner.heard == [("paused",)] and stream.buffered > 64 * 1024
        received = await read_from(peer, len(payload))
        await until(lambda: ("resumed",) in owner.heard)
        assert received == payload and stream.buffered == 0
        assert owner.heard == [("paused",), ("resumed",)]
        stream.close()
        peer.close()

    run(scenario)


def test_half_close_waits_for_queued_bytes():
    async def scenario() -> None:
        stream, peer, _, _ = make_stream(asyncio.get_running_loop())
        payload = b"z" * (4 << 20)
        stream.write(payload)
        stream.shutdown_write()
        assert await read_from(peer) == payload  # every byte, then the FIN
        stream.close()
        peer.close()

    run(scenario)


def test_close_after_flush_delivers_everything_then_closes():
    async def scenario() -> None:
        stream, peer, _, _ = make_stream(asyncio.get_running_loop())
        payload = b"q" * (4 << 20)
        stream.write(payload)
        stream.close(after_flush=True)
        assert not stream.closed
        assert await read_from(peer) == payload
        await until(lambda: stream.closed)
        peer.close()

    run(scenario)


def test_writing_to_a_gone_peer_is_a_failure_for_the_owner():
    async def scenario() -> None:
        stream, peer, owner, block = make_stream(asyncio.get_running_loop())
        peer.close()
        stream.write(b"x" * 1000)  # the send itself fails: EPIPE
        assert owner.heard == [("failed", BrokenPipeError)]
        assert block[DOWNSTREAM_TX] == 0
        stream.close()
        assert stream.closed

    run(scenario)


def test_a_lent_fd_is_read_by_the_borrower_and_its_bytes_counted_on_return():
    async def scenario() -> None:
        stream, peer, owner, _ = make_stream(asyncio.get_running_loop())
        stream.resume_reading()
        borrowed = []
        stream.lend(lambda: borrowed.append(stream.sock.recv(100)))
        peer.sendall(b"for the borrower")
        await until(lambda: borrowed == [b"for the borrower"])
        stream.take_back(16, 0)
        assert stream.bytes_in == 16 and owner.heard == []
        peer.sendall(b"back")
        await until(lambda: owner.data() == b"back")
        stream.close()
        peer.close()

    run(scenario)


def test_detach_hands_over_the_socket_with_what_was_unsent():
    async def scenario() -> None:
        stream, peer, _, _ = make_stream(asyncio.get_running_loop())
        stream.cork()
        stream.write(b"not yet sent")
        sock, unsent = stream.detach()
        assert unsent == b"not yet sent" and stream.closed and sock.fileno() >= 0
        sock.close()
        peer.close()

    run(scenario)
