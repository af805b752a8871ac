"""gRPC framing: messages across arbitrary splits, limits, malformed input; call semantics helpers."""

from __future__ import annotations

import random

import pytest

from pyproxy.codec import grpc


def _stream(sizes):
    return b"".join(grpc.frame(bytes([i % 251]) * size) for i, size in enumerate(sizes))


@pytest.mark.parametrize("seed", range(20))
def test_messages_survive_any_split(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 5, 100, 4096, 70000]) for _ in range(12)]
    wire = _stream(sizes)
    framer = grpc.MessageFramer()
    got = []
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 9000)
        got += framer.feed(wire[pos : pos + step])
        pos += step
    framer.finish()
    assert [len(m.data) for m in got] == sizes
    assert all(bytes(m.data) == bytes([i % 251]) * sizes[i] for i, m in enumerate(got))
    assert framer.messages == len(sizes) and framer.bytes == sum(sizes)


def test_message_inside_one_chunk_is_not_copied():
    wire = grpc.frame(b"x" * 100) + grpc.frame(b"y" * 10)
    messages = grpc.MessageFramer().feed(wire)
    assert isinstance(messages[0].data, memoryview) and messages[0].data.obj is wire


def test_oversized_message_fails_at_its_prefix():
    framer = grpc.MessageFramer(max_size=1000)
    with pytest.raises(grpc.FramingError) as info:
        framer.feed(b"\x00" + (1001).to_bytes(4, "big"))  # no payload needed to know
    assert info.value.status == grpc.RESOURCE_EXHAUSTED


def test_bad_flag_and_truncation_are_internal():
    with pytest.raises(grpc.FramingError) as info:
        grpc.MessageFramer().feed(b"\x07\x00\x00\x00\x01x")
    assert info.value.status == grpc.INTERNAL
    framer = grpc.MessageFramer()
    assert framer.feed(grpc.frame(b"abc")[:6]) == []
    with pytest.raises(grpc.FramingError, match="inside a message"):
        framer.finish()


def test_timeouts_and_status_helpers():
    assert grpc.parse_timeout(b"100m") == pytest.approx(0.1)
    assert grpc.parse_timeout(b"2S") == 2 and grpc.parse_timeout(b"1H") == 3600
    for bad in (b"", b"m", b"123456789S", b"1x", b"-1S"):
        assert grpc.parse_timeout(bad) is None
    assert grpc.method_of(b"/pkg.Svc/Call") == "pkg.Svc/Call"
    assert grpc.is_grpc(b"application/grpc+proto") and not grpc.is_grpc(b"application/json")
    assert grpc.percent_encode("é 100%") == b"%C3%A9 100%25"
    assert grpc.status_from_headers([(b"grpc-status", b"14"), (b"grpc-message", b"down")]) == (
        14,
        b"down",
    )
    headers = grpc.trailers_only_headers(grpc.UNAVAILABLE, "no healthy upstream")
    assert (b"grpc-status", b"14") in headers and (b"content-type", b"application/grpc") in headers
