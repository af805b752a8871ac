"""The accept path with a stale watch in the event loop (uvloop, real sockets, in process).

A socket closed while uvloop still watched it (its watch closed by a poll error, not removed)
leaves that fd number unwatchable: `add_reader` raises RuntimeError for the next socket given
the number. The listener drops such a watch before it starts a new connection on the number.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from conftest import ThreadedServer, echo_handler, hold_numbers_below, listener_block

from pyproxy.config import build_config
from pyproxy.listener import Listener

uvloop = pytest.importorskip("uvloop")


async def _leave_a_stale_watch(loop, side: socket.socket) -> tuple[int, socket.socket]:
    """Watch a socket for writing with its send buffer full; its peer resets (a poll error closes
    the watch, which stays in the loop's table); the socket is then closed unwatched. Returns
    its number, the lowest free one, and a socket holding the peer's number meanwhile."""
    peer = socket.create_connection(side.getsockname())
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock, _ = side.accept()
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    loop.add_writer(sock.fileno(), lambda: None)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    filler = socket.socket()  # takes the peer's number, so the next socket made gets ours
    await asyncio.sleep(0.1)
    fd = sock.fileno()
    sock.close()
    return fd, filler


async def _relay_through_a_stale_number(upstream: str) -> tuple[bytes, bool]:
    """The reply to a ping relayed by a listener, and whether the listener accepted that
    connection onto the number with the stale watch (a number freed in the instant between
    filling the holes and the accept can take it instead: conftest.hold_numbers_below)."""
    loop = asyncio.get_running_loop()
    config = build_config(
        {
            "listeners": [
                {"name": "main", "mode": "tcp", "address": "127.0.0.1:0", "upstream": upstream}
            ]
        }
    )
    block = listener_block()
    listener = Listener(loop, config.listeners[0], block, False, set(), config)
    listener.start()
    address = listener.acceptor.sockets[0].getsockname()
    client = socket.socket()
    client.setblocking(False)
    side = socket.create_server(("127.0.0.1", 0))
    stale, filler = await _leave_a_stale_watch(loop, side)
    held = hold_numbers_below(stale)
    assert held is not None  # so the listener's next accepted socket gets it
    try:
        await loop.sock_connect(client, address)
        await loop.sock_sendall(client, b"ping")
        reply = await asyncio.wait_for(loop.sock_recv(client, 16), 3)
        try:
            with socket.socket(fileno=os.dup(stale)) as accepted:
                on_stale = accepted.getpeername() == client.getsockname()
        except OSError:  # the number is free, or no connected socket's
            on_stale = False
    finally:
        for spare in held:
            os.close(spare)
    client.close()
    side.close()
    filler.close()
    listener.stop_accepting()
    return reply, on_stale


def test_a_connection_accepted_on_a_number_with_a_stale_watch_is_served():
    upstream = ThreadedServer(echo_handler)
    try:
        for _ in range(3):
            reply, on_stale = uvloop.run(_relay_through_a_stale_number(upstream.address))
            assert reply == b"ping"
            if on_stale:
                break
    finally:
        upstream.close()
    assert on_stale
