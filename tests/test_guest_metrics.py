"""Metrics defined by filter programs: per-worker shared slots, merged by name when read."""

from __future__ import annotations

from pyproxy.guest_metrics import COUNTER, GAUGE, HISTOGRAM, MAX_NAME, GuestMetricsRegion


def test_workers_metrics_merge_by_name_and_kind():
    region = GuestMetricsRegion(2)
    first, second = region.worker(0), region.worker(1)
    for metrics, hits in ((first, 3), (second, 4)):
        counter = metrics.define(COUNTER, b"hits")
        gauge = metrics.define(GAUGE, b"open")
        histogram = metrics.define(HISTOGRAM, b"size")
        assert None not in (counter, gauge, histogram)
        metrics.add(counter, hits)
        metrics.set(gauge, 1)
        metrics.observe(histogram, 10 * hits)
    assert region.merged() == {
        "hits": {"type": "counter", "value": 7},
        "open": {"type": "gauge", "value": 2},
        "size": {"type": "histogram", "count": 2, "sum": 70},
    }


def test_a_name_keeps_its_kind_and_a_restarted_worker_finds_its_slots():
    region = GuestMetricsRegion(1)
    metrics = region.worker(0)
    slot = metrics.define(COUNTER, b"requests")
    assert metrics.define(COUNTER, b"requests") == slot
    assert metrics.define(GAUGE, b"requests") is None  # another type under the same name
    assert metrics.define(COUNTER, b"x" * (MAX_NAME + 1)) is None
    assert metrics.define(7, b"bad kind") is None
    metrics.add(slot, 5)
    again = region.worker(0)  # a new process for the same worker index
    assert again.define(COUNTER, b"requests") == slot and again.get(slot) == 5


def test_values_wrap_as_64_bit_integers():
    metrics = GuestMetricsRegion(1).worker(0)
    gauge = metrics.define(GAUGE, b"g")
    assert gauge is not None
    metrics.set(gauge, 2**64 - 1)  # a u64 the guest passes as all ones
    assert metrics.get(gauge) == -1
    metrics.add(gauge, 1)
    assert metrics.get(gauge) == 0
