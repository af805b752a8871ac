"""The native express lane's C pair (native/express_lane.c), driven directly over socketpairs.

Each test calls the reader callbacks the event loop would call, so every
handover kind is reached deterministically, including short sends, and the
accounts the pair keeps in the listener block are checked slot by slot.
"""

from __future__ import annotations

import errno
import socket

import pytest
from conftest import listener_block
from pyproxy.native import express_pair

from pyproxy import counters as c

_express = express_pair()
pytestmark = pytest.mark.skipif(_express is None, reason="native extension not built")

# In express_lane.c's `enum slot` order: downstream read/write, upstream read/write (ns, events)...
SLOTS = (
    c.STAGE_NS + c.IPC, c.STAGE_EVENTS + c.IPC, c.STAGE_NS + c.IPC, c.STAGE_EVENTS + c.IPC,
    c.STAGE_NS + c.READ, c.STAGE_EVENTS + c.READ, c.STAGE_NS + c.WRITE, c.STAGE_EVENTS + c.WRITE,
    c.STAGE_NS + c.PARSE, c.STAGE_EVENTS + c.PARSE, c.STAGE_EVENTS + c.NOTIFY, c.STAGE_NS + c.OTHER,
    c.DOWNSTREAM_RX, c.DOWNSTREAM_TX, c.UPSTREAM_RX, c.UPSTREAM_TX,
    c.REQUESTS, c.EXPRESS_REQUESTS, c.NATIVE_REQUESTS, c.STAGE_NS, c.STAGE_NS + len(c.STAGES),
)  # fmt: skip

REQUEST = b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok"


class Rig:
    """client <-> [down | pair | up] <-> app, every socket non-blocking; handovers recorded."""

    def __init__(self, timed: bool = True) -> None:
        self.client, down = socket.socketpair()
        up, self.app = socket.socketpair()
        self.down, self.up = down, up
        for sock in (self.client, down, up, self.app):
            sock.setblocking(False)
        self.block = listener_block()
        self.handovers: list[tuple[int, object]] = []
        self.pair = _express.Pair(
            down.fileno(), up.fileno(), self.block, SLOTS, timed, 60 * 1024, 100,
            lambda kind, payload: self.handovers.append((kind, payload)),
        )  # fmt: skip

    def request(self, data: bytes) -> None:
        self.client.sendall(data)
        self.pair.downstream_readable()

    def respond(self, data: bytes) -> None:
        self.app.sendall(data)
        self.pair.upstream_readable()

    def close(self) -> None:
        for sock in (self.client, self.down, self.up, self.app):
            sock.close()


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.close()


def test_a_plain_exchange_is_forwarded_less_hop_by_hop_and_accounted(rig):
    rig.request(REQUEST)
    assert rig.app.recv(4096) == b"GET /a HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n"
    assert rig.pair.in_flight and rig.pair.request == REQUEST
    rig.respond(RESPONSE)
    assert rig.client.recv(4096) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert not rig.pair.in_flight and rig.handovers == []
    block = rig.block
    assert block[c.REQUESTS] == block[c.EXPRESS_REQUESTS] == block[c.NATIVE_REQUESTS] == 1
    assert block[c.STATUS_BASE + 1] == 1 and block[c.HIST_COUNT] == 1 and block[c.HIST_SUM_NS] > 0
    assert sum(block[c.HIST_BASE : c.HIST_BASE + len(c.BUCKETS) + 1]) == 1
    assert block[c.DOWNSTREAM_RX] == len(REQUEST) and block[c.UPSTREAM_RX] == len(RESPONSE)
    assert block[c.UPSTREAM_TX] == len(REQUEST) - len(b"Connection: keep-alive\r\n")
    assert block[c.DOWNSTREAM_TX] == len(RESPONSE) - len(b"Keep-Alive: timeout=5\r\n")
    # One read and one send on each side, two scans, two readiness notifications.
    assert block[c.STAGE_EVENTS + c.IPC] == 2 and block[c.STAGE_EVENTS + c.READ] == 1
    assert block[c.STAGE_EVENTS + c.WRITE] == 1 and block[c.STAGE_EVENTS + c.PARSE] == 2
    assert block[c.STAGE_EVENTS + c.NOTIFY] == 2
    for stage in (c.IPC, c.READ, c.WRITE, c.PARSE):
        assert block[c.STAGE_NS + stage] > 0
    assert rig.pair.down_in == len(REQUEST) and rig.pair.up_in == len(RESPONSE)
    assert rig.pair.served == 1


def test_a_body_and_204_are_carried(rig):
    rig.request(b"POST /e HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello")
    assert rig.app.recv(4096).endswith(b"\r\n\r\nhello")
    rig.respond(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert rig.client.recv(4096).startswith(b"HTTP/1.1 204")
    assert rig.handovers == [] and rig.block[c.NATIVE_REQUESTS] == 1


def test_untimed_pairs_still_count_requests_and_durations():
    rig = Rig(timed=False)
    try:
        rig.request(REQUEST)
        rig.app.recv(4096)
        rig.respond(RESPONSE)
        assert rig.block[c.NATIVE_REQUESTS] == 1 and rig.block[c.HIST_COUNT] == 1
        assert rig.block[c.STAGE_EVENTS + c.PARSE] == 0 and rig.block[c.STAGE_NS + c.OTHER] == 0
    finally:
        rig.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /a HTTP/1.1\r\nHost: svc\r\n",  # head in pieces
        b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 9\r\n\r\nhalf",  # body to come
        REQUEST + REQUEST,  # pipelined
        b"HEAD /a HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET /a HTTP/1.0\r\n\r\n",
        b"GET http://svc/a HTTP/1.1\r\nHost: svc\r\n\r\n",  # absolute-form: routing decides
        b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: x-drop\r\n\r\n",  # a named option
        b"\x16\x03\x01 not http",
    ],
)
def test_anything_but_one_whole_plain_request_is_handed_over_as_read(rig, request_bytes):
    rig.request(request_bytes)
    assert rig.handovers == [(_express.DOWN_DATA, request_bytes)]
    assert rig.pair.released and not rig.pair.in_flight
    with pytest.raises(BlockingIOError):
        rig.app.recv(4096)  # nothing went upstream
    rig.client.sendall(REQUEST)
    rig.pair.downstream_readable()  # inert now: the fd is Python's
    assert len(rig.handovers) == 1 and rig.down.recv(4096) == REQUEST


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",  # in pieces
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        RESPONSE + RESPONSE,
    ],
)
def test_anything_but_one_whole_plain_response_is_handed_over_as_read(rig, response):
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(response)
    assert rig.handovers == [(_express.UP_DATA, response)]
    assert rig.pair.in_flight and rig.pair.request == REQUEST  # Python carries the request on
    assert rig.block[c.NATIVE_REQUESTS] == 0 and rig.block[c.REQUESTS] == 1


def test_eofs_are_handed_over_as_empty_reads(rig):
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.app.shutdown(socket.SHUT_WR)
    rig.pair.upstream_readable()
    assert rig.handovers == [(_express.UP_DATA, b"")]
    other = Rig()
    try:
        other.client.shutdown(socket.SHUT_WR)
        other.pair.downstream_readable()
        assert other.handovers == [(_express.DOWN_DATA, b"")]
    finally:
        other.close()


def test_readiness_out_of_turn_is_handed_over_without_reading(rig):
    rig.app.sendall(b"stray")
    rig.pair.upstream_readable()  # nothing in flight: the pool's rules apply (Python)
    assert rig.handovers == [(_express.UP_IDLE_READABLE, None)]
    assert rig.up.recv(16) == b"stray"
    other = Rig()
    try:
        other.request(REQUEST)
        other.client.sendall(REQUEST)
        other.pair.downstream_readable()  # a request in flight: pipelining is Python's
        assert other.handovers == [(_express.DOWN_READABLE, None)]
        assert other.down.recv(4096) == REQUEST
    finally:
        other.close()


def _fill(sock: socket.socket) -> int:
    """Send until the kernel takes no more; how much it took."""
    total = 0
    try:
        while True:
            total += sock.send(b"x" * 65536)
    except BlockingIOError:
        return total


def test_a_short_request_send_hands_over_the_rest(rig):
    rig.up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _fill(rig.up)
    body = b"b" * 40000
    request = b"POST /big HTTP/1.1\r\nHost: svc\r\nContent-Length: 40000\r\n\r\n" + body
    rig.request(request)
    [(kind, rest)] = rig.handovers
    assert kind == _express.REQUEST_UNSENT and 0 < len(rest) <= len(request)
    assert request.endswith(rest) and rig.pair.in_flight
    assert rig.block[c.UPSTREAM_TX] == len(request) - len(rest)


def test_a_short_response_send_hands_over_the_rest_with_the_exchange_counted(rig):
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.down.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _fill(rig.down)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 40000\r\n\r\n" + b"r" * 40000
    rig.app.sendall(response)
    while rig.handovers == [] and rig.pair.in_flight:
        rig.pair.upstream_readable()  # the app's write may arrive in a few segments
    [(kind, rest)] = rig.handovers
    if kind == _express.UP_DATA:
        pytest.skip("the response did not arrive in one read on this kernel")
    assert kind == _express.RESPONSE_UNSENT and response.endswith(rest)
    assert not rig.pair.in_flight and rig.block[c.NATIVE_REQUESTS] == 1


def test_send_failures_are_handed_over_with_errno(rig):
    rig.app.close()
    rig.request(REQUEST)
    [(kind, code)] = rig.handovers
    assert kind == _express.UP_FAILED and code in (errno.EPIPE, errno.ECONNRESET)
    assert rig.pair.in_flight  # the request is Python's now: retry or 503


def test_bad_arguments_are_refused():
    block = listener_block()
    with pytest.raises(ValueError, match="smaller than one listener"):
        _express.Pair(0, 1, block[:64], SLOTS, True, 1024, 10, print)
    with pytest.raises(ValueError, match="slots"):
        _express.Pair(0, 1, block, SLOTS[:-1], True, 1024, 10, print)
    with pytest.raises(ValueError, match="outside the block"):
        _express.Pair(0, 1, block, (*SLOTS[:-1], c.LISTENER_SLOTS + 1), True, 1024, 10, print)
    with pytest.raises(TypeError):
        _express.Pair(0, 1, block, SLOTS, True, 1024, 10, "not callable")
