"""The C pair's hooks (Pair.set_hooks in native/express_lane.c), driven over real socketpairs.

A request hook and a response hook see each whole plain head once (and, set with bodies,
its whole body) and answer
None (forward as read), bytes (forward this head instead) or False (hand the
message over, byte-exact); a done hook hears the end of each exchange.
"""

from __future__ import annotations

import gc
import sys
import time
import weakref

import pytest
from pyproxy.native import express_pair
from test_native_pair import REQUEST, RESPONSE, Rig

from pyproxy import counters as c

_express = express_pair()
pytestmark = pytest.mark.skipif(_express is None, reason="native extension not built")

POST = b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"


class Hooks:
    """Records every call; answers what the test says."""

    def __init__(self, request_answer=None, response_answer=None) -> None:
        self.request_answer, self.response_answer = request_answer, response_answer
        self.requests: list[tuple] = []
        self.responses: list[tuple] = []
        self.done = 0

    def request(self, method, target, fields, authority, content_length):
        self.requests.append((method, target, fields, authority, content_length))
        return self.request_answer

    def response(self, status, fields, content_length):
        self.responses.append((status, fields, content_length))
        return self.response_answer

    def finished(self):
        self.done += 1


def hooked(rig: Rig, hooks: Hooks, request=True, response=True, done=True) -> Hooks:
    rig.pair.set_hooks(
        hooks.request if request else None,
        hooks.response if response else None,
        hooks.finished if done else None,
    )
    return hooks


@pytest.fixture
def rig():
    made = Rig()
    yield made
    made.close()


def test_hooks_answering_none_forward_as_without_hooks(rig):
    hooks = hooked(rig, Hooks())
    for served in range(2):
        rig.request(REQUEST)
        assert rig.app.recv(4096) == b"GET /a HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n"
        assert hooks.done == served  # not before the response has gone
        rig.respond(RESPONSE)
        assert rig.client.recv(4096) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert rig.handovers == [] and hooks.done == 2
    method, target, fields, authority, content_length = hooks.requests[0]
    assert (method, target, authority, content_length) == (b"GET", b"/a", b"svc", -1)
    assert authority is fields[0][1]  # the Host field's own value, not a copy
    # Every field, names lower-cased, as the general path's request head has them.
    assert fields == [(b"host", b"svc"), (b"connection", b"keep-alive"), (b"x-a", b"1")]
    status, fields, content_length = hooks.responses[0]
    assert (status, content_length) == (200, 2)
    assert fields == [(b"content-length", b"2")]  # less hop-by-hop, as encode filters see it
    block = rig.block
    assert block[c.REQUESTS] == block[c.NATIVE_REQUESTS] == 2 and block[c.STATUS_BASE + 1] == 2


def test_a_request_with_a_body_says_its_length_and_its_body_follows_a_new_head(rig):
    hooks = hooked(rig, Hooks(request_answer=b"POST /rewritten HTTP/1.1\r\nhost: svc\r\n\r\n"))
    rig.request(POST)
    assert hooks.requests[0][4] == 5
    assert rig.app.recv(4096) == b"POST /rewritten HTTP/1.1\r\nhost: svc\r\n\r\nhello"
    assert rig.pair.request == POST  # what Python replays on a handover is what was read
    assert rig.block[c.UPSTREAM_TX] == len(b"POST /rewritten HTTP/1.1\r\nhost: svc\r\n\r\nhello")


def test_a_response_head_answered_as_bytes_replaces_the_head(rig):
    hooked(rig, Hooks(response_answer=b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-b: 2\r\n\r\n"))
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert rig.client.recv(4096) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-b: 2\r\n\r\nok"
    assert rig.handovers == [] and rig.block[c.NATIVE_REQUESTS] == 1


def test_a_large_rewritten_request_goes_whole(rig):
    big = b"POST /big HTTP/1.1\r\nHost: svc\r\nContent-Length: 30000\r\n\r\n" + b"x" * 30000
    head = (
        b"POST /big HTTP/1.1\r\nhost: svc\r\ncontent-length: 30000\r\nx-pad: "
        + b"p" * 40000
        + b"\r\n\r\n"
    )
    hooked(rig, Hooks(request_answer=head))
    rig.client.sendall(big)
    time.sleep(0.05)
    rig.pair.downstream_readable()
    got = b""
    while len(got) < len(head) + 30000:
        got += rig.app.recv(1 << 20)
    assert got == head + b"x" * 30000


def test_a_field_list_answer_is_written_after_the_start_line_as_read(rig):
    fields = [(b"host", b"svc"), (b"connection", b"keep-alive"), (b"x-a", b"1"), (b"x-b", b"2")]
    hooks = hooked(rig, Hooks(request_answer=fields, response_answer=[]))
    hooks.response_answer = [(b"content-length", b"2"), (b"x-b", b"2")]
    rig.request(REQUEST)
    # Hop-by-hop fields are left out of a request, as the general path strips them.
    assert rig.app.recv(4096) == b"GET /a HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\nx-b: 2\r\n\r\n"
    rig.respond(RESPONSE)
    assert rig.client.recv(4096) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-b: 2\r\n\r\nok"
    assert rig.handovers == [] and hooks.done == 1 and rig.block[c.NATIVE_REQUESTS] == 1
    hooks.request_answer = [(b"host", b"svc"), (b"content-length", b"5"), (b"x-b", b"2")]
    rig.request(POST)
    assert rig.app.recv(4096) == (
        b"POST /up HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\nx-b: 2\r\n\r\nhello"
    )


UNWRITABLE = {
    "framing changed": [(b"host", b"svc")],  # the POST's Content-Length is gone
    "line break in a value": [(b"host", b"svc"), (b"content-length", b"5"), (b"x", b"1\r\nx-y: 2")],
    "not a pair": [(b"host", b"svc"), (b"content-length", b"5"), (b"x",)],
    "not bytes": [(b"host", b"svc"), (b"content-length", b"5"), ("x", b"1")],
    "upper case": [(b"host", b"svc"), (b"content-length", b"5"), (b"Connection", b"close")],
    "connection names a field": [
        (b"host", b"svc"), (b"content-length", b"5"), (b"connection", b"x-a"), (b"x-a", b"1"),
    ],
    "bad name": [(b"host", b"svc"), (b"content-length", b"5"), (b"x a", b"1")],
}  # fmt: skip


@pytest.mark.parametrize("fields", UNWRITABLE.values(), ids=list(UNWRITABLE))
def test_a_field_list_the_pair_cannot_write_takes_the_request(rig, fields):
    hooks = hooked(rig, Hooks(request_answer=fields))
    rig.request(POST)
    assert rig.handovers == [(_express.REQUEST_TAKEN, POST)]
    assert rig.block[c.REQUESTS] == 0 and rig.block[c.UPSTREAM_TX] == 0 and hooks.done == 0


@pytest.mark.parametrize(
    "fields",
    [
        [(b"content-length", b"3")],
        [(b"content-length", b"2"), (b"connection", b"close")],
        [(b"content-length", b"2"), (b"transfer-encoding", b"chunked")],
    ],
    ids=["length changed", "close", "chunked"],
)
def test_a_field_list_that_reframes_a_response_takes_it(rig, fields):
    hooked(rig, Hooks(response_answer=fields))
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert rig.handovers == [(_express.RESPONSE_TAKEN, RESPONSE)] and rig.pair.in_flight


@pytest.mark.parametrize("side", ["request", "response"])
def test_a_hook_may_clear_done_wanted_with_a_new_head(rig, side):
    hooks = Hooks()

    def request(*args):
        if side == "request":
            rig.pair.done_wanted = 0
            return b"GET /b HTTP/1.1\r\nhost: svc\r\n\r\n"
        return None

    def response(*args):
        rig.pair.done_wanted = 0
        return [(b"content-length", b"2")]

    rig.pair.set_hooks(request, response if side == "response" else None, hooks.finished)
    for _ in range(2):
        rig.request(REQUEST)
        rig.app.recv(4096)
        rig.respond(RESPONSE)
        assert rig.client.recv(4096).endswith(b"ok") and hooks.done == 0 and rig.handovers == []
    rig.pair.set_hooks(None, None, hooks.finished)  # no hook clears it: called again
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert hooks.done == 1


def test_a_request_taken_is_handed_over_byte_exact_and_not_counted(rig):
    hooks = hooked(rig, Hooks(request_answer=False))
    rig.request(POST)
    assert rig.handovers == [(_express.REQUEST_TAKEN, POST)]
    assert rig.pair.released and not rig.pair.in_flight and hooks.done == 0
    rig.app.setblocking(False)
    with pytest.raises(BlockingIOError):
        rig.app.recv(4096)  # nothing went upstream
    assert rig.block[c.REQUESTS] == 0 and rig.block[c.UPSTREAM_TX] == 0


def test_a_response_taken_is_handed_over_byte_exact_in_flight_and_not_accounted(rig):
    hooks = hooked(rig, Hooks(response_answer=False))
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert rig.handovers == [(_express.RESPONSE_TAKEN, RESPONSE)]
    assert rig.pair.in_flight and rig.pair.request == REQUEST and hooks.done == 0
    block = rig.block
    assert block[c.REQUESTS] == 1 and block[c.NATIVE_REQUESTS] == 0 and block[c.HIST_COUNT] == 0


def test_a_request_hook_answering_true_forwards_and_skips_the_done_hook(rig):
    hooks = hooked(rig, Hooks(request_answer=True))
    rig.request(REQUEST)
    assert rig.app.recv(4096) == b"GET /a HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n"
    rig.respond(RESPONSE)
    assert rig.client.recv(4096).endswith(b"ok") and len(hooks.responses) == 1
    assert hooks.done == 0 and rig.handovers == []
    hooks.request_answer = None  # the next exchange wants its done hook again
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert hooks.done == 1


def test_a_response_hook_answering_true_hands_over(rig, monkeypatch):
    reported: list = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    hooked(rig, Hooks(response_answer=True))
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert rig.handovers == [(_express.RESPONSE_TAKEN, RESPONSE)]
    assert isinstance(reported[0].exc_value, TypeError)


def test_only_the_hooks_set_are_called(rig):
    hooks = hooked(rig, Hooks(), request=False, done=False)
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert hooks.requests == [] and len(hooks.responses) == 1 and hooks.done == 0
    rig.pair.set_hooks(None, None, None)
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(RESPONSE)
    assert len(hooks.responses) == 1 and rig.handovers == []


def test_hooks_set_with_bodies_get_each_whole_body_after_its_head(rig):
    seen: list = []

    def request(method, target, fields, authority, content_length, body):
        seen.append((target, content_length, body))

    def response(status, fields, content_length, body):
        seen.append((status, content_length, body))
        # A new head: the body as read still follows it.
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"

    rig.pair.set_hooks(request, response, None, True)
    rig.request(POST)
    assert rig.app.recv(4096) == POST
    rig.respond(RESPONSE)
    assert rig.client.recv(4096) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    rig.request(REQUEST)
    rig.app.recv(4096)
    rig.respond(b"HTTP/1.1 204 No Content\r\n\r\n")
    rig.client.recv(4096)
    assert seen == [(b"/up", 5, b"hello"), (200, 2, b"ok"), (b"/a", -1, b""), (204, -1, b"")]
    assert rig.handovers == [] and rig.block[c.NATIVE_REQUESTS] == 2
    rig.pair.set_hooks(None, None, None)  # without bodies (the default) again: no body argument
    hooks = hooked(rig, Hooks())
    rig.request(POST)
    rig.app.recv(4096)
    assert hooks.requests[0][4] == 5 and len(hooks.requests[0]) == 5


def test_set_hooks_refuses_what_cannot_be_called(rig):
    with pytest.raises(TypeError):
        rig.pair.set_hooks(1, None, None)
    with pytest.raises(TypeError):
        rig.pair.set_hooks(None, None)


@pytest.mark.parametrize("side", ["request", "response"])
@pytest.mark.parametrize("answer", ["raise", "wrong type"])
def test_a_hook_that_fails_hands_the_message_over(rig, side, answer, monkeypatch):
    reported: list = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def hook(*args):
        if answer == "raise":
            raise RuntimeError("filter bug")
        return 42

    rig.pair.set_hooks(
        hook if side == "request" else None, hook if side == "response" else None, None
    )
    rig.request(REQUEST)
    if side == "request":
        assert rig.handovers == [(_express.REQUEST_TAKEN, REQUEST)]
    else:
        rig.app.recv(4096)
        rig.respond(RESPONSE)
        assert rig.handovers == [(_express.RESPONSE_TAKEN, RESPONSE)]
    expected = RuntimeError if answer == "raise" else TypeError
    assert len(reported) == 1 and isinstance(reported[0].exc_value, expected)


def test_a_hook_that_drops_the_hooks_mid_call_is_safe(rig):
    """native_lane's release() clears the hooks; a hook may release the pair it is called by."""

    def request(*args):
        rig.pair.set_hooks(None, None, None)
        return b"GET /other HTTP/1.1\r\nhost: svc\r\n\r\n"

    rig.pair.set_hooks(request, None, None)
    del request
    rig.request(REQUEST)
    assert rig.app.recv(4096) == b"GET /other HTTP/1.1\r\nhost: svc\r\n\r\n"
    rig.respond(RESPONSE)
    rig.request(REQUEST)  # no hooks any more: as read, less hop-by-hop
    rig.app.recv(4096)
    assert rig.handovers == []


def test_a_done_hook_that_raises_is_reported_and_the_pair_carries_on(rig, monkeypatch):
    reported: list = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def done():
        raise RuntimeError("log failed")

    rig.pair.set_hooks(None, None, done)
    for _ in range(2):
        rig.request(REQUEST)
        rig.app.recv(4096)
        rig.respond(RESPONSE)
        assert rig.client.recv(4096).endswith(b"ok")
    assert rig.handovers == [] and len(reported) == 2


def test_hooks_hold_no_references_beyond_the_pair():
    rig = Rig()
    hooks = Hooks()
    request, response, finished = hooks.request, hooks.response, hooks.finished
    before = [sys.getrefcount(f) for f in (request, response, finished)]
    rig.pair.set_hooks(request, response, finished)
    assert [sys.getrefcount(f) for f in (request, response, finished)] == [n + 1 for n in before]
    for _ in range(50):
        rig.request(REQUEST)
        rig.app.recv(4096)
        rig.respond(RESPONSE)
        rig.client.recv(4096)
    # Fifty exchanges leave nothing behind: the arguments die with each call.
    assert [sys.getrefcount(f) for f in (request, response, finished)] == [n + 1 for n in before]
    fields = hooks.requests[0][2]
    hooks.requests.clear()
    assert sys.getrefcount(fields) == 2  # ours and getrefcount's: the pair kept none
    rig.pair.set_hooks(None, None, None)
    assert [sys.getrefcount(f) for f in (request, response, finished)] == before
    rig.pair.set_hooks(request, response, finished)
    pair = rig.pair
    rig.pair = None
    del pair
    gc.collect()
    assert [sys.getrefcount(f) for f in (request, response, finished)] == before
    rig.close()


def test_a_hook_cycle_through_the_pair_is_collected():
    """A hook that refers back to the pair (as native_lane's do) is freed by the GC."""
    rig = Rig()

    class Owner:
        def __init__(self) -> None:
            self.pair = rig.pair

        def hook(self, *args):
            return None

    owner = Owner()
    rig.pair.set_hooks(owner.hook, None, None)
    alive = weakref.ref(owner)
    del owner
    rig.pair = None
    gc.collect()
    assert alive() is None
    rig.close()
