"""Detection decides from bytes alone (no socket): Detection and protocol_for as plain values;
the I/O side (pyproxy/io/first_bytes.py) on a real socket pair with a real event loop."""

from __future__ import annotations

import asyncio
import socket

from conftest import listener_block

from pyproxy.codec.http2 import PREFACE
from pyproxy.config import build_config
from pyproxy.counters import DOWNSTREAM_RX, READ, STAGE_EVENTS
from pyproxy.http.detect import AUTO, HTTP, HTTP1, HTTP2, TCP, Detection, protocol_for
from pyproxy.io.first_bytes import TIMED_OUT, FirstBytes


def _listener(**extra):
    base = {"name": "l", "mode": "http", "address": "127.0.0.1:1", "upstream": "127.0.0.1:2"}
    return build_config({"listeners": [dict(base, **extra)]}).listeners[0]


def test_capture_detection_falls_back_to_tcp_at_eof_and_timeout():
    detection = Detection(_listener(detect="auto", detect_timeout="30ms"), AUTO)
    assert detection.timeout == 0.03
    assert detection.on_bytes(b"GET / HT") is None
    assert detection.on_bytes(b"GET / HTTP/1.1\r\n") == HTTP1
    assert detection.on_bytes(PREFACE) == HTTP2
    assert detection.on_eof(b"HELO") == TCP  # what arrived still goes through, opaque
    assert detection.on_eof(b"") is None  # nothing arrived: nothing to relay
    assert detection.on_timeout() == TCP  # server-first protocols are never stalled


def test_http_only_detection_never_becomes_tcp():
    config = _listener(http={"request_header_timeout": "2s"})
    detection = Detection(config, HTTP)
    assert detection.timeout == 2.0  # the slowloris bound, not detect_timeout
    assert detection.on_bytes(b"\x16\x03\x01") == HTTP1  # HTTP/1 answers 400 to it
    assert detection.on_eof(b"GET") is None
    assert detection.on_timeout() is None


def test_protocol_for_port_overrides_the_detect_setting():
    config = _listener(detect="auto", ports={3306: "tcp", 8080: "http2"})
    assert protocol_for(config, 3306) == TCP
    assert protocol_for(config, 8080) == HTTP2
    assert protocol_for(config, 80) == AUTO
    assert protocol_for(config, None) == AUTO  # a Unix socket has no port


def _read_first_bytes(send: list[bytes], close: bool, timeout: str = "1s"):
    """Run a FirstBytes reader over a socket pair; returns (protocol, flag, data, block)."""

    async def run():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        block = listener_block()
        decided = loop.create_future()
        detection = Detection(_listener(detect="auto", detect_timeout=timeout), AUTO)
        reader = FirstBytes(
            loop, ours, block, True, READ, detection,
            lambda r, protocol, flag: decided.set_result((protocol, flag, r.data)),
        )  # fmt: skip
        reader.start()
        for chunk in send:
            theirs.send(chunk)
            await asyncio.sleep(0.01)
        if close:
            theirs.close()
        result = await asyncio.wait_for(decided, 3)
        ours.close()
        if not close:
            theirs.close()
        return (*result, block)

    return asyncio.run(run())


def test_first_bytes_reads_until_the_decision_and_hands_on_every_byte():
    protocol, flag, data, block = _read_first_bytes([b"GET / HT", b"TP/1.1\r\nHost: x\r\n"], False)
    assert (protocol, flag) == (HTTP1, "")
    assert data == b"GET / HTTP/1.1\r\nHost: x\r\n"
    assert block[DOWNSTREAM_RX] == len(data)
    assert block[STAGE_EVENTS + READ] == 2  # each read metered in the stage it was given


def test_first_bytes_at_eof_and_at_timeout():
    assert _read_first_bytes([b"HEL"], True)[:3] == (TCP, "", b"HEL")
    assert _read_first_bytes([], True)[:3] == (None, "", b"")
    assert _read_first_bytes([b"GET"], False, "50ms")[:3] == (TCP, TIMED_OUT, b"GET")
