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


@pytest.mark.parametrize("seed", range(30))
def test_scanner_counts_like_the_framer_across_any_split(seed):
    rng = random.Random(1000 + seed)
    sizes = [rng.choice([0, 0, 1, 4, 5, 6, 100, 4096, 70000]) for _ in range(rng.randint(1, 15))]
    wire = _stream(sizes)
    scanner = grpc.MessageScanner()
    pos, completed, boundaries = 0, 0, 0
    ends = {sum(s + grpc.PREFIX for s in sizes[: i + 1]) for i in range(len(sizes))}
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 5, 7, rng.randint(1, 9000)])
        completed += scanner.feed(memoryview(wire)[pos : pos + step])
        pos = min(pos + step, len(wire))
        # at_boundary tells whether what passed so far is whole messages.
        assert scanner.at_boundary == (pos in ends)
        boundaries += scanner.at_boundary
    scanner.finish()
    assert completed == scanner.messages == len(sizes)
    assert scanner.bytes == sum(sizes)


def test_scanner_holds_no_payload_and_checks_prefixes():
    big = grpc.frame(b"z" * 3_000_000)
    scanner = grpc.MessageScanner()
    for i in range(0, len(big), 16384):
        scanner.feed(big[i : i + 16384])
        assert len(scanner._prefix) < grpc.PREFIX
    assert scanner.messages == 1 and scanner.at_boundary
    small = grpc.MessageScanner(max_size=10)
    small.feed(b"\x00\x00")  # a prefix cut after two bytes: the limit is checked once it is whole
    with pytest.raises(grpc.FramingError) as exc:
        small.feed(b"\x00\x00\x0b")
    assert exc.value.status == grpc.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.FramingError) as exc:
        grpc.MessageScanner().feed(grpc.frame(b"ok") + b"\x02\x00\x00\x00\x00")
    assert exc.value.status == grpc.INTERNAL
    truncated = grpc.MessageScanner()
    truncated.feed(grpc.frame(b"abcdef")[:-1])
    with pytest.raises(grpc.FramingError) as exc:
        truncated.finish()
    assert exc.value.status == grpc.INTERNAL
