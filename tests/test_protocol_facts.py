"""Protocol facts and response accounting exist once: pyproxy/protocol.py and pyproxy/counters.py.

The native build writes them into native/protocol_facts.h (native/facts_header.py) for the C
pair, the C head scan and the C HTTP/2 codec. These tests check that the header on disk is what
the generator writes now, and that C and Python agree where the facts act: the C pair's
accounting against counters.account_response at the edges (bucket bounds, past the last one,
statuses of every class and beyond 5xx), the same exchanges carried by the pair and by the
general path, and the hop-by-hop lines the C scan drops.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import listener_block, start_listener
from pyproxy.native import express_pair, facts_header, http1_head_scanner
from test_express import Client, RawUpstream
from test_native_pair import Rig

from pyproxy import counters as c
from pyproxy import protocol
from pyproxy.codec.http1 import strip_hop_by_hop_lines

_express = express_pair()
_scan = http1_head_scanner()
needs_native = pytest.mark.skipif(_express is None, reason="native extensions not built")

# Every status class, the no-body statuses, and past 5xx (the clamp); 0 is "no response made".
STATUSES = (
    0,
    100,
    101,
    199,
    200,
    201,
    204,
    299,
    304,
    399,
    400,
    404,
    499,
    500,
    503,
    599,
    600,
    799,
    999,
)
# Around every bucket bound, and far past the last one (days: the sums stay in an int64).
DURATIONS = sorted(
    {0, 1, -1, 10**15, 2**53}
    | {b + d for b in c.BUCKET_BOUNDS_NS for d in (-1, 0, 1)}
)  # fmt: skip
ACCOUNTED = slice(c.STATUS_BASE, c.HIST_COUNT + 1)  # the status and histogram slots


# ---- the facts themselves ----------------------------------------------------------------


def test_the_rules_say_what_rfc_9110_says():
    assert protocol.has_body(200, b"GET") and protocol.has_body(599, b"POST")
    for status in (100, 101, 199, 204, 304):
        assert not protocol.has_body(status, b"GET"), status
    assert not protocol.has_body(200, b"HEAD")
    assert protocol.framing_allowed(200) and protocol.framing_allowed(304)
    assert not protocol.framing_allowed(204) and not protocol.framing_allowed(101)
    assert [protocol.status_class(s) for s in (100, 204, 304, 404, 599, 600, 999)] == [
        1, 2, 3, 4, 5, 5, 5,
    ]  # fmt: skip
    assert protocol.H2_CONNECTION_SPECIFIC <= protocol.HOP_BY_HOP


def test_python_accounting_buckets_as_bisect_left_and_clamps_the_class():
    block = listener_block()
    bound = c.BUCKET_BOUNDS_NS[3]
    c.account_response(block, 204, bound)  # on a bound: that bucket
    c.account_response(block, 204, bound + 1)  # past it: the next
    c.account_response(block, 600, c.BUCKET_BOUNDS_NS[-1] + 1)  # past the last: +Inf; 6xx: 5xx
    c.account_response(block, 0, 0)  # no response: a duration, no class
    assert block[c.STATUS_BASE + 1] == 2 and block[c.STATUS_BASE + 4] == 1
    assert sum(block[c.STATUS_BASE : c.STATUS_BASE + protocol.STATUS_CLASSES]) == 3
    assert block[c.HIST_BASE + 0] == 1 and block[c.HIST_BASE + 3] == 1
    assert block[c.HIST_BASE + 4] == 1 and block[c.HIST_BASE + len(c.BUCKETS)] == 1
    assert block[c.HIST_COUNT] == 4
    assert block[c.HIST_SUM_NS] == 2 * bound + 1 + c.BUCKET_BOUNDS_NS[-1] + 1


# ---- the generated header --------------------------------------------------------------


@needs_native
def test_the_header_on_disk_is_the_one_protocol_py_makes_now():
    with open(facts_header.HEADER) as header:
        assert header.read() == facts_header.header_text(), (
            "native/protocol_facts.h is stale: rebuild the native modules (make .venv/.installed-test)"
        )


def test_the_build_step_writes_that_header(tmp_path):
    """setup.py runs the generator as a script from the source tree; it must write the same text."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(facts_header.__file__)))
    out = tmp_path / "protocol_facts.h"
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, facts_header.__file__, str(out)], check=True, env=env)
    assert out.read_text() == facts_header.header_text()
    assert not facts_header.write_header(str(out))  # unchanged: left alone (no rebuild)


def test_the_header_carries_every_fact():
    text = facts_header.header_text()
    for name in protocol.HOP_BY_HOP | protocol.H2_CONNECTION_SPECIFIC:
        assert f'{{"{name.decode()}", {len(name)}}}' in text
    for status in protocol.NO_BODY_STATUSES:
        assert f"case {status}:" in text
    for bound in c.BUCKET_BOUNDS_NS:
        assert f"{bound}LL" in text
    for name in ("STATUS_BASE", "HIST_BASE", "HIST_SUM_NS", "HIST_COUNT", "LISTENER_SLOTS"):
        assert f"#define PF_{name} {getattr(c, name)}\n" in text


# ---- C against Python -------------------------------------------------------------------


@needs_native
def test_the_c_accounting_equals_python_at_every_edge():
    c_total, py_total = listener_block(), listener_block()
    for status in STATUSES:
        for elapsed in DURATIONS:
            c_one, py_one = listener_block(), listener_block()
            _express.account_response(c_one, status, elapsed)
            c.account_response(py_one, status, elapsed)
            assert c_one.tolist() == py_one.tolist(), (status, elapsed)
            _express.account_response(c_total, status, elapsed)
            c.account_response(py_total, status, elapsed)
    assert c_total.tolist() == py_total.tolist()
    with pytest.raises(ValueError, match="listener"):
        _express.account_response(listener_block()[:8], 200, 1)


# Responses the pair carries whole: status line and framing as an app sends them.
CARRIED = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",  # no Content-Length: no body (protocol.NO_BODY_STATUSES)
    b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nerr",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
)


def _through_the_pair(response: bytes) -> tuple[list[int], memoryview, bytes]:
    """One GET and ``response`` through a fresh pair: (handover kinds, its block, what the
    client got)."""
    rig = Rig()
    try:
        rig.request(b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
        rig.app.recv(4096)
        rig.respond(response)
        kinds = [kind for kind, _ in rig.handovers]
        got = rig.client.recv(4096) if not kinds else b""
        return kinds, rig.block, got
    finally:
        rig.close()


@needs_native
@pytest.mark.parametrize("response", CARRIED, ids=lambda r: r[9:12].decode())
def test_an_exchange_the_pair_carries_counts_as_the_general_path_counts_it(response):
    kinds, block, got = _through_the_pair(response)
    assert kinds == [] and got == response
    elapsed = block[c.HIST_SUM_NS]  # the pair's own measure of this exchange
    assert elapsed > 0
    python = listener_block()
    c.account_response(python, int(response[9:12]), elapsed)
    assert block[ACCOUNTED].tolist() == python[ACCOUNTED].tolist()


@needs_native
@pytest.mark.parametrize(
    "response",
    (
        b"HTTP/1.1 200 OK\r\n\r\n",  # a body delimited by close: the general path's
        b"HTTP/1.1 100 Continue\r\n\r\n",  # interim
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",  # past 5xx: counted as Python counts
    ),
    ids=("until-close", "1xx", "6xx"),
)
def test_what_the_pair_does_not_carry_it_hands_to_the_general_path_uncounted(response):
    kinds, block, _ = _through_the_pair(response)
    assert kinds == [_express.UP_DATA]
    assert block[ACCOUNTED].tolist() == listener_block()[ACCOUNTED].tolist()


@needs_native
def test_a_head_request_is_left_to_the_general_path():
    rig = Rig()
    try:
        rig.request(b"HEAD /a HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert [kind for kind, _ in rig.handovers] == [_express.DOWN_DATA]
    finally:
        rig.close()


@pytest.mark.skipif(_scan is None, reason="native extensions not built")
@pytest.mark.parametrize("name", sorted(protocol.HOP_BY_HOP | {b"x-kept"}))
def test_the_c_scan_drops_the_hop_by_hop_lines_python_drops(name):
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n%s: keep-alive\r\nX-After: 1\r\n\r\n"
        % name.title()
    )
    found = _scan(raw, False, 65536, 100)
    if name in (b"transfer-encoding", b"upgrade"):
        assert found is None  # framing the scan leaves to llhttp
        return
    wire, headers = found[-1], found[4]
    assert wire == strip_hop_by_hop_lines(raw, headers)
    assert (name.title() in wire) == (name not in protocol.HOP_BY_HOP)


# ---- through a proxy: the pair and the general path ---------------------------------------


class StatusUpstream(RawUpstream):
    """GET /NNN answers status NNN, bodiless when protocol.status_has_body says so."""

    def _answer(self, conn: socket.socket, path: bytes, body: bytes) -> bool:
        status = int(path[1:])
        if protocol.status_has_body(status):
            conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % status)
        else:
            conn.sendall(b"HTTP/1.1 %d X\r\n\r\n" % status)
        return True


EXCHANGES = (200, 204, 304, 404, 500, 200, 503, 204, 200, 600, 200, 304)


@needs_native
def test_the_pair_and_the_general_path_give_the_same_counters(start_proxy, tmp_path):
    app = StatusUpstream()
    seen = {}
    try:
        for lane in ("native", "off"):
            proxy, port = start_listener(
                start_proxy, tmp_path, app.address, f"    http:\n      express_lane: {lane}\n"
            )
            client = Client(port)
            heads = [client.get(b"/%d" % status)[0].split(b"\r\n")[0] for status in EXCHANGES]
            assert heads == [b"HTTP/1.1 %d X" % status for status in EXCHANGES]
            stats = proxy.wait_for(lambda s: s["duration"]["count"] == len(EXCHANGES))
            client.close()
            proxy.proc.kill()
            proxy.proc.wait()
            seen[lane] = stats
    finally:
        app.server.close()
    native, general = seen["native"], seen["off"]
    assert native["native_requests"] > 0 and general["native_requests"] == 0
    for key in ("requests", "responses", "flags"):
        assert native[key] == general[key], key
    assert native["duration"]["count"] == general["duration"]["count"] == len(EXCHANGES)
    assert native["responses"] == {"1xx": 0, "2xx": 6, "3xx": 2, "4xx": 1, "5xx": 3}
