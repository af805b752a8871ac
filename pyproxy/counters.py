"""The stage clock's storage: int64 accumulators in shared memory, one block per worker and listener.

The hot path only adds integers into a memoryview over an anonymous shared
mapping created before the workers fork; the admin process reads every
worker's block and sums at scrape time. No locks: each slot has one writer.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left

from pyproxy.guest_metrics import GuestMetricsRegion
from pyproxy.protocol import STATUS_CLASSES, status_class

# Stages, in MeshInsight's component order. Filter stages follow, one per filter slot.
STAGES = ("ipc", "read", "write", "notify", "parse", "other")
IPC, READ, WRITE, NOTIFY, PARSE, OTHER = range(6)
MAX_FILTERS = 16
FILTER_STAGE_BASE = len(STAGES)  # filter slot i's stage is FILTER_STAGE_BASE + i
STAGE_SLOTS = FILTER_STAGE_BASE + MAX_FILTERS

# Response flags, Envoy's vocabulary where one exists.
FLAGS = (
    "UF",  # upstream connection failure (refused, unreachable, connect timeout)
    "UT",  # upstream timeout
    "UR",  # upstream reset
    "DR",  # downstream reset
    "SI",  # idle timeout
    "NR",  # no route (e.g. original destination is the proxy itself)
    "DC",  # downstream terminated before the upstream was reached
    "LR",  # connection reset locally
    "DPE",  # downstream protocol error
    "FI",  # fault injected
    "RL",  # rate limited
    "UO",  # overflow
    "UC",  # upstream connection terminated before the response (HTTP 503)
    "UPE",  # upstream protocol error (HTTP 502)
    "DT",  # request header timeout (HTTP 408)
    "DI",  # delay injected (fault filter)
)
FLAG_INDEX = {name: i for i, name in enumerate(FLAGS)}

# Why downstream input was refused before any of it reached the upstream (the hostile-input
# classes; each refusal also carries its response flag, DPE for most).
REJECTS = (
    "request_line",  # HTTP/1 request line or target malformed (400), HTTP/0.9 (400)
    "version",  # an HTTP version this hop cannot speak, e.g. "HTTP/2.0" on HTTP/1 (505)
    "method",  # CONNECT: not relayed (501)
    "header",  # a field name or value that is not allowed (400)
    "framing",  # message framing in doubt: CL/TE conflicts, bad chunks, framing named in Connection
    "too_large",  # header section over the limits (431)
    "pseudo_header",  # HTTP/2 :method, :path, :scheme, :authority invalid (RFC 9113 §8.3)
    "h2_protocol",  # HTTP/2 connection error (GOAWAY PROTOCOL_ERROR and kin)
    "h2_flood",  # HTTP/2 abuse: rapid reset, CONTINUATION or control-frame flood (ENHANCE_YOUR_CALM)
    "grpc_framing",  # gRPC message framing: compressed flag, length, truncation
)
REJECT_INDEX = {name: i for i, name in enumerate(REJECTS)}

# Connection (TCP) / request (HTTP) duration buckets, seconds.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
BUCKET_BOUNDS_NS = tuple(int(b * 1e9) for b in BUCKETS)

# Slot offsets within one listener's block.
STAGE_NS = 0
STAGE_EVENTS = STAGE_NS + STAGE_SLOTS
CONNECTIONS_TOTAL = STAGE_EVENTS + STAGE_SLOTS
CONNECTIONS_ACTIVE = CONNECTIONS_TOTAL + 1
DOWNSTREAM_RX = CONNECTIONS_ACTIVE + 1
DOWNSTREAM_TX = DOWNSTREAM_RX + 1
UPSTREAM_RX = DOWNSTREAM_TX + 1
UPSTREAM_TX = UPSTREAM_RX + 1
MESSAGES = UPSTREAM_TX + 1  # downstream reads that carried data: TCP mode's "message"
REQUESTS = MESSAGES + 1
# Requests the HTTP/1 express lanes carried end to end (http/express.py, http/native_lane.py)...
EXPRESS_REQUESTS = REQUESTS + 1
NATIVE_REQUESTS = EXPRESS_REQUESTS + 1  # ... and those of them the native lane carried (in C)
# Overload (pyproxy/admission.py): refused beyond the worker's limits, never started.
REFUSED_CONNECTIONS = NATIVE_REQUESTS + 1
REFUSED_REQUESTS = REFUSED_CONNECTIONS + 1
FLAG_BASE = REFUSED_REQUESTS + 1
STATUS_BASE = FLAG_BASE + len(FLAGS)  # responses by class: 1xx..5xx (protocol.status_class)
HIST_BASE = STATUS_BASE + STATUS_CLASSES
HIST_SUM_NS = HIST_BASE + len(BUCKETS) + 1  # buckets, then +Inf
HIST_COUNT = HIST_SUM_NS + 1
# MSG_ZEROCOPY accounting (write: zerocopy), published by io/zerocopy_writer.py.
ZC_FIELDS = (
    "sends",  # sends that went MSG_ZEROCOPY
    "plain_sends",  # sends by copy on a zerocopy socket: below the threshold, or ENOBUFS
    "fallbacks",  # the ENOBUFS subset of plain_sends
    "completed",  # zerocopy sends the kernel reported done
    "copied",  # completed ones the kernel copied anyway (always, on loopback)
    "notifications",  # error-queue messages read
    "outstanding_bytes",  # gauge: bytes pinned until their completion arrives
)
ZC_BASE = HIST_COUNT + 1
# Each filter slot owns a few counters of its own (names declared by its factory: `counter_names`).
FILTER_COUNTERS_PER_SLOT = 4
FILTER_COUNTERS_BASE = ZC_BASE + len(ZC_FIELDS)
# gRPC calls: listener totals, then a bounded table of per-method entries (names included, so a
# worker's block stands alone); layout and access in pyproxy/grpc_metrics.py.
GRPC_BASE = FILTER_COUNTERS_BASE + MAX_FILTERS * FILTER_COUNTERS_PER_SLOT
GRPC_METHOD_SLOTS = 32  # per worker and listener; later methods count under "other"
GRPC_NAME_WORDS = 15  # 120 bytes of method name per entry
GRPC_ENTRY = 2 + 17 + GRPC_NAME_WORDS  # name length, started, one per grpc-status, name
GRPC_SLOTS = 2 + len(BUCKETS) + 3 + (GRPC_METHOD_SLOTS + 1) * GRPC_ENTRY
REJECT_BASE = GRPC_BASE + GRPC_SLOTS  # downstream input refused, one slot per REJECTS reason
# gRPC lane reads (http/grpc_lane.py): those of a lane's two connections the lane took whole in
# one C call (GrpcLane.carry), and the rest, which went on in Python (a PING, SETTINGS, a HEADERS
# the lane does not take...) and cost a pass more: the bench tells the two apart. Each read
# counts once, on its own path (/stats adds them up as `all`).
LANE_READS_WHOLE = REJECT_BASE + len(REJECTS)
LANE_READS_PYTHON = LANE_READS_WHOLE + 1
LISTENER_SLOTS = LANE_READS_PYTHON + 1

# Per-worker header slots.
W_PID = 0
W_READY = 1
W_NOTIFY_COST_NS = 2  # calibrated cost of one readiness notification (see io/notify.py)
W_STARTED_NS = 3
W_DRAINING = 4
W_TRIMS = 5  # heap trims after connections fell back (see memory_trim.py)
WORKER_HEADER = 8

MAX_LISTENERS = 64


class CounterStore:
    """One shared mapping: for each worker a header plus MAX_LISTENERS listener blocks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._stride = WORKER_HEADER + MAX_LISTENERS * LISTENER_SLOTS
        self._map = mmap.mmap(-1, workers * self._stride * 8)
        self._all = memoryview(self._map).cast("q")
        # Listener names by slot, assigned in the supervisor before fork and on reload.
        self._slots: dict[str, int] = {}
        # Metrics filter programs define (Proxy-Wasm), per worker, merged by name when read.
        self.guest_metrics = GuestMetricsRegion(workers)

    def slot_for(self, listener_name: str) -> int:
        slot = self._slots.get(listener_name)
        if slot is None:
            if len(self._slots) >= MAX_LISTENERS:
                raise RuntimeError(f"more than {MAX_LISTENERS} listener names seen")
            slot = self._slots[listener_name] = len(self._slots)
        return slot

    def slots(self) -> dict[str, int]:
        return dict(self._slots)

    def worker_header(self, worker: int) -> memoryview:
        base = worker * self._stride
        return self._all[base : base + WORKER_HEADER]

    def listener_block(self, worker: int, slot: int) -> memoryview:
        base = worker * self._stride + WORKER_HEADER + slot * LISTENER_SLOTS
        return self._all[base : base + LISTENER_SLOTS]

    def summed_block(self, slot: int) -> list[int]:
        """The listener's slots summed over every worker (admin side, scrape time)."""
        total = [0] * LISTENER_SLOTS
        for worker in range(self.workers):
            block = self.listener_block(worker, slot).tolist()
            total = [a + b for a, b in zip(total, block, strict=True)]
            # notify is derived: readiness events x this worker's calibrated cost.
            total[STAGE_NS + NOTIFY] += block[STAGE_EVENTS + NOTIFY] * self.notify_cost_ns(worker)
        return total

    def worker_connections(self, worker: int) -> int:
        return sum(
            self.listener_block(worker, slot)[CONNECTIONS_TOTAL] for slot in self._slots.values()
        )

    def notify_cost_ns(self, worker: int) -> int:
        return self.worker_header(worker)[W_NOTIFY_COST_NS]

    def worker_died(self, worker: int) -> None:
        """A worker's live state died with it: zero its gauges (totals and histograms stay)."""
        self.worker_header(worker)[W_READY] = 0
        for slot in self._slots.values():
            block = self.listener_block(worker, slot)
            block[CONNECTIONS_ACTIVE] = 0
            block[ZC_BASE + ZC_FIELDS.index("outstanding_bytes")] = 0


def reject_slot(reason: str) -> int:
    """The block slot counting refusals for ``reason`` (look it up once, add to it on the hot path)."""
    return REJECT_BASE + REJECT_INDEX[reason]


def duration_bucket(elapsed_ns: int) -> int:
    """The histogram bucket of a duration: the first bound it does not exceed, else the last
    (+Inf) one, len(BUCKETS). Every histogram here (the listener's, gRPC's) buckets this way."""
    return bisect_left(BUCKET_BOUNDS_NS, elapsed_ns)


def count_status(block: memoryview, status: int) -> None:
    """Count one response in its status class (a reply made before any request ended, too)."""
    block[STATUS_BASE + status_class(status) - 1] += 1


def observe_duration(block: memoryview, elapsed_ns: int) -> None:
    """Add one observation to the listener's duration histogram (cumulative at export)."""
    block[HIST_BASE + duration_bucket(elapsed_ns)] += 1
    block[HIST_SUM_NS] += elapsed_ns
    block[HIST_COUNT] += 1


def account_response(block: memoryview, status: int, elapsed_ns: int) -> None:
    """The one accounting of a finished request: its status class (none when no response
    was made, status 0) and its duration. The C pair does the same from protocol_facts.h,
    which native/facts_header.py generates from this layout."""
    if status:
        count_status(block, status)
    observe_duration(block, elapsed_ns)
