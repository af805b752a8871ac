"""gRPC call metrics in fixed shared-memory slots: per-method counters under dynamic names, merged by name at scrape time.

Metrics must stay int64 slots written by one worker each (counters.py), yet
methods are only known when calls arrive. So each worker's listener block
holds a bounded table of method entries: the first GRPC_METHOD_SLOTS
distinct methods a worker sees get an entry (their name is written into the
entry's slots, then its length, which publishes it); later ones and paths
that do not look like `/package.Service/Method` count under "other", so a
client inventing paths cannot grow memory or label sets. Workers assign
entries independently — no cross-process lock — and the admin process merges
the workers' tables by name when it builds a snapshot.
"""

from __future__ import annotations

from pyproxy.codec.grpc import STATUS_NAMES
from pyproxy.counters import (
    BUCKETS,
    GRPC_BASE,
    GRPC_ENTRY,
    GRPC_METHOD_SLOTS,
    GRPC_NAME_WORDS,
    CounterStore,
    duration_bucket,
)

OTHER = "other"
NAME_BYTES = GRPC_NAME_WORDS * 8

# Offsets from GRPC_BASE.
MSG_RECEIVED = GRPC_BASE  # request messages from the downstream (the caller)
MSG_SENT = GRPC_BASE + 1  # response messages toward the downstream
HIST = GRPC_BASE + 2  # call duration buckets, then +Inf
HIST_SUM_NS = HIST + len(BUCKETS) + 1
HIST_COUNT = HIST_SUM_NS + 1
ENTRIES = HIST_COUNT + 1
# Within an entry.
E_NAME_LEN, E_STARTED, E_STATUS = 0, 1, 2
E_NAME = E_STATUS + len(STATUS_NAMES)
OTHER_ENTRY = ENTRIES + GRPC_METHOD_SLOTS * GRPC_ENTRY


class GrpcMethodTable:
    """One worker's view of one listener's method entries: name → entry offset, cached in a dict."""

    __slots__ = ("block", "offsets", "used")

    def __init__(self, block: memoryview) -> None:
        self.block = block
        self.offsets: dict[str, int] = {}
        self.used = 0
        # A reloaded listener context finds the entries this worker already published.
        for i in range(GRPC_METHOD_SLOTS):
            base = ENTRIES + i * GRPC_ENTRY
            if not block[base + E_NAME_LEN]:
                break
            self.offsets[_read_name(block, base)] = base
            self.used = i + 1

    def entry(self, method: str) -> int:
        """The entry counting `method`, assigned on first sight while free entries last."""
        base = self.offsets.get(method)
        if base is not None:
            return base
        encoded = method.encode("utf-8", "replace")
        if (
            self.used >= GRPC_METHOD_SLOTS
            or not _looks_like_method(method)
            or len(encoded) > NAME_BYTES
        ):
            return OTHER_ENTRY  # not cached: the dict stays bounded too
        base = ENTRIES + self.used * GRPC_ENTRY
        self.used += 1
        block = self.block
        padded = encoded.ljust(-(-len(encoded) // 8) * 8, b"\0")
        for i in range(0, len(padded), 8):
            block[base + E_NAME + i // 8] = int.from_bytes(padded[i : i + 8], "little", signed=True)
        block[base + E_NAME_LEN] = len(
            encoded
        )  # written last: the admin reads only published names
        self.offsets[method] = base
        return base


def _looks_like_method(method: str) -> bool:
    service, sep, name = method.partition("/")
    return bool(sep and service and name) and "/" not in name


def _read_name(block, base: int) -> str:
    length = block[base + E_NAME_LEN]
    words = block[base + E_NAME : base + E_NAME + GRPC_NAME_WORDS].tolist()
    raw = b"".join(w.to_bytes(8, "little", signed=True) for w in words)
    return raw[:length].decode("utf-8", "replace")


def record_finished(
    block, entry: int, status: int, elapsed_ns: int, received: int, sent: int
) -> None:
    """A call ended: its status under its method, its duration, its messages (hot path: adds only)."""
    block[entry + E_STATUS + status] += 1
    block[MSG_RECEIVED] += received
    block[MSG_SENT] += sent
    block[HIST + duration_bucket(elapsed_ns)] += 1
    block[HIST_SUM_NS] += elapsed_ns
    block[HIST_COUNT] += 1


def grpc_snapshot(store: CounterStore, slot: int) -> dict:
    """One listener's gRPC metrics, merged over workers by method name (admin side)."""
    methods: dict[str, dict] = {}
    received = sent = count = sum_ns = 0
    hist = [0] * (len(BUCKETS) + 1)
    for worker in range(store.workers):
        block = store.listener_block(worker, slot)
        received += block[MSG_RECEIVED]
        sent += block[MSG_SENT]
        count += block[HIST_COUNT]
        sum_ns += block[HIST_SUM_NS]
        for i, value in enumerate(block[HIST : HIST + len(hist)].tolist()):
            hist[i] += value
        for i in range(GRPC_METHOD_SLOTS + 1):
            base = ENTRIES + i * GRPC_ENTRY
            if i == GRPC_METHOD_SLOTS:
                name = OTHER
            elif block[base + E_NAME_LEN]:
                name = _read_name(block, base)
            else:
                continue
            started = block[base + E_STARTED]
            if not started and name == OTHER:
                continue
            merged = methods.setdefault(name, {"started": 0, "statuses": {}})
            merged["started"] += started
            statuses = merged["statuses"]
            for code, label in enumerate(STATUS_NAMES):
                value = block[base + E_STATUS + code]
                if value:
                    statuses[label] = statuses.get(label, 0) + value
    cumulative, buckets = 0, {}
    for bound, value in zip(BUCKETS, hist, strict=False):
        cumulative += value
        buckets[str(bound)] = cumulative
    return {
        "calls_started": sum(m["started"] for m in methods.values()),
        "calls_finished": count,
        "messages": {"received": received, "sent": sent},
        "methods": methods,
        "duration": {"count": count, "sum_seconds": sum_ns / 1e9, "buckets": buckets},
    }


def grpc_families(snap: dict):
    """Prometheus metric families for every listener that saw gRPC calls (scrape time)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    started = CounterMetricFamily(
        "pyproxy_grpc_calls_started", "gRPC calls started", labels=["listener", "method"]
    )
    finished = CounterMetricFamily(
        "pyproxy_grpc_calls",
        "gRPC calls finished, by grpc-status",
        labels=["listener", "method", "grpc_status"],
    )
    messages = CounterMetricFamily(
        "pyproxy_grpc_messages",
        "gRPC messages: received from callers, sent to callers",
        labels=["listener", "direction"],
    )
    duration = HistogramMetricFamily(
        "pyproxy_grpc_call_duration_seconds", "gRPC call duration", labels=["listener"]
    )
    for name, listener in snap["listeners"].items():
        grpc = listener.get("grpc")
        if grpc is None:
            continue
        for method, values in grpc["methods"].items():
            started.add_metric([name, method], values["started"])
            for status, value in values["statuses"].items():
                finished.add_metric([name, method, status], value)
        for direction, value in grpc["messages"].items():
            messages.add_metric([name, direction], value)
        hist = grpc["duration"]
        buckets = [(str(float(b)), hist["buckets"][str(b)]) for b in BUCKETS]
        duration.add_metric([name], buckets + [("+Inf", hist["count"])], hist["sum_seconds"])
    return started, finished, messages, duration
