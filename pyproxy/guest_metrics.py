"""Metrics that filter programs define while they run (Proxy-Wasm's proxy_define_metric), in
shared memory: one region per worker with one writer each, merged by name at scrape time.

Names are the programs' own, as Envoy shows them. A slot is four int64s (kind + 1, value,
histogram sum, name length) followed by the name; the name is written before the kind, so a
reader never sees a kind without its name. Across workers, counters and gauges are summed (each
worker's program keeps its own gauge) and histograms add up their count and sum.
"""

from __future__ import annotations

import mmap

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2  # proxy_metric_type_t
KINDS = ("counter", "gauge", "histogram")
SLOTS = 512  # metrics per worker
SLOT_BYTES = 256
NAME_OFFSET = 32
MAX_NAME = SLOT_BYTES - NAME_OFFSET
_INTS = SLOT_BYTES // 8
_MASK = (1 << 64) - 1


class GuestMetrics:
    """One worker's metrics (or a private set, for a module's load check): defined by name, then
    added to by slot."""

    def __init__(self, region: memoryview | None = None) -> None:
        self.raw = region if region is not None else memoryview(bytearray(SLOTS * SLOT_BYTES))
        self.ints = self.raw.cast("q")
        # A restarted worker finds its predecessor's metrics (totals outlive a process).
        self.slots: dict[bytes, int] = {}
        for slot in range(SLOTS):
            base = slot * _INTS
            if self.ints[base]:
                start = slot * SLOT_BYTES + NAME_OFFSET
                self.slots[bytes(self.raw[start : start + self.ints[base + 3]])] = slot

    def define(self, kind: int, name: bytes) -> int | None:
        """The slot for `name` (made on first use); None when the name is too long, full, or
        already defined as another kind."""
        slot = self.slots.get(name)
        if slot is not None:
            return slot if self.ints[slot * _INTS] == kind + 1 else None
        if len(name) > MAX_NAME or len(self.slots) >= SLOTS or not 0 <= kind <= 2:
            return None
        slot = len(self.slots)
        start = slot * SLOT_BYTES + NAME_OFFSET
        self.raw[start : start + len(name)] = name
        base = slot * _INTS
        self.ints[base + 3] = len(name)
        self.ints[base] = kind + 1
        self.slots[name] = slot
        return slot

    def kind(self, slot: int) -> int:
        return self.ints[slot * _INTS] - 1

    def add(self, slot: int, delta: int) -> None:
        base = slot * _INTS + 1
        self.ints[base] = _wrap(self.ints[base] + delta)

    def set(self, slot: int, value: int) -> None:
        self.ints[slot * _INTS + 1] = _wrap(value)

    def observe(self, slot: int, value: int) -> None:
        """A histogram value: its count and sum."""
        base = slot * _INTS + 1
        self.ints[base] = _wrap(self.ints[base] + 1)
        self.ints[base + 1] = _wrap(self.ints[base + 1] + value)

    def get(self, slot: int) -> int:
        return self.ints[slot * _INTS + 1]


def _wrap(value: int) -> int:
    """Two's complement int64, as the guest's u64/i64 arithmetic would leave it."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


class GuestMetricsRegion:
    """Every worker's metrics, in one anonymous shared mapping made before the workers fork."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, workers * SLOTS * SLOT_BYTES)

    def worker(self, index: int) -> GuestMetrics:
        size = SLOTS * SLOT_BYTES
        return GuestMetrics(memoryview(self._map)[index * size : (index + 1) * size])

    def merged(self) -> dict[str, dict]:
        """{name: {"type": ..., "value": ...}} (histograms: "count" and "sum"), summed over workers."""
        out: dict[str, dict] = {}
        for index in range(self.workers):
            metrics = self.worker(index)
            for name, slot in metrics.slots.items():
                kind = metrics.kind(slot)
                key = name.decode(errors="replace")
                entry = out.get(key)
                if entry is None:
                    entry = out[key] = {"type": KINDS[kind]}
                    if kind == HISTOGRAM:
                        entry.update(count=0, sum=0)
                    else:
                        entry["value"] = 0
                elif entry["type"] != KINDS[kind]:
                    continue  # another worker's program defined it as another kind: first wins
                base = slot * _INTS + 1
                if kind == HISTOGRAM:
                    entry["count"] += metrics.ints[base]
                    entry["sum"] += metrics.ints[base + 1]
                else:
                    entry["value"] += metrics.ints[base]
        return out


# The worker process's own metrics: bound once by the worker at start (one per process).
_bound: GuestMetrics | None = None


def bind(metrics: GuestMetrics) -> None:
    global _bound
    _bound = metrics


def current() -> GuestMetrics:
    """This worker's metrics; outside a worker (tests, tools), a private set."""
    global _bound
    if _bound is None:
        _bound = GuestMetrics()
    return _bound
