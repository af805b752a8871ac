"""A Stream closed after-flush by its owner still owns its socket: a peer that resets instead of
reading must not leave the event loop watching a closed fd number (uvloop, real sockets)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct

import pytest
from conftest import hold_numbers_below, listener_block

from pyproxy.counters import DOWNSTREAM_RX, DOWNSTREAM_TX, IPC, READ
from pyproxy.io.stream import Stream

uvloop = pytest.importorskip("uvloop")


class _Owner:
    """The session side: it has let go (closed), so whatever it hears now is ignored."""

    def __init__(self) -> None:
        self.failures: list[OSError] = []

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass

    def stream_failed(self, error: OSError) -> None:
        self.failures.append(error)

    def write_paused(self) -> None:
        pass

    def write_resumed(self) -> None:
        pass


def _closing_stream(loop, listener: socket.socket) -> tuple[Stream, socket.socket]:
    """A Stream with 16 MiB queued for a peer that never reads, closed after-flush by its owner."""
    block = listener_block()
    peer = socket.create_connection(listener.getsockname())
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock, _ = listener.accept()
    sock.setblocking(False)
    stream = Stream(
        loop, sock, block, _Owner(), timed=False, read_stage=IPC, write_stage=READ,
        rx_slot=DOWNSTREAM_RX, tx_slot=DOWNSTREAM_TX,
    )  # fmt: skip
    stream.resume_reading()
    stream.write(b"x" * (16 << 20))  # most of it stays queued
    stream.close(after_flush=True)  # the owner is done; the stream waits to flush
    return stream, peer


def _accept_onto(listener: socket.socket, number: int, queued: int) -> socket.socket:
    """Accept one of the `queued` connections waiting on `listener` onto the free fd `number`
    (onto whatever number is lowest if `number` is taken). A lower number freed in the instant
    between filling the holes and the accept (conftest.hold_numbers_below) takes the accepted
    socket instead: it is held, and the next connection tried."""
    wrong: list[socket.socket] = []
    try:
        for _ in range(queued - 1):
            held = hold_numbers_below(number)
            if held is None:
                break
            try:
                new, _ = listener.accept()
            finally:
                for spare in held:
                    os.close(spare)
            if new.fileno() == number:
                return new
            wrong.append(new)
        new, _ = listener.accept()
        return new
    finally:
        for sock in wrong:
            sock.close()


async def _closed_stream_then_peer_resets() -> tuple[bool, bool]:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stream, peer = _closing_stream(loop, listener)
        fd = stream.fd
        assert not stream.closed
        # Connections waiting in the backlog, made while the stream's number is still taken.
        others = [socket.create_connection(listener.getsockname()) for _ in range(4)]
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset, not a read
        for _ in range(50):
            await asyncio.sleep(0.01)
            if stream.closed:
                break
        closed_by_itself = stream.closed
        del stream
        gc.collect()  # whatever is left open is closed now, as the garbage collector would
        new = _accept_onto(listener, fd, len(others))
        new.setblocking(False)
        try:
            loop.add_reader(new.fileno(), lambda: None)
            loop.remove_reader(new.fileno())
            watchable = True
        except RuntimeError:
            watchable = False
        assert new.fileno() == fd or not closed_by_itself
        new.close()
        for other in others:
            other.close()
        return closed_by_itself, watchable


def test_a_stream_closing_after_flush_closes_itself_when_the_peer_resets():
    closed_by_itself, watchable = uvloop.run(_closed_stream_then_peer_resets())
    assert closed_by_itself
    assert watchable


async def _lingering_stream() -> bool:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stream, peer = _closing_stream(loop, listener)
        await asyncio.sleep(0.3)
        closed = stream.closed
        peer.close()
        return closed


def test_a_stream_closing_after_flush_gives_up_on_a_peer_that_never_reads(monkeypatch):
    monkeypatch.setattr("pyproxy.io.stream.CLOSE_LINGER_S", 0.1)
    assert uvloop.run(_lingering_stream())
