"""One request's record: what it is, where it went, its deadline, how it ended — accounted once.

Every request the general path carries is an Exchange, and every Exchange is
a RequestRecord: the start time, route, target, route timeout, status,
response flag, bytes and stage trace live here, and ``account_end`` is the
one place a finished request is counted (response flag, status class,
duration histogram, admission); its status class and duration go through
counters.account_response. Requests are counted when read (``REQUESTS``, by
the session that read them). The native lane (native_lane.py) ends the
exchanges it carries whole with the C form of account_response, generated
from the same definitions into native/protocol_facts.h; a request it hands
back mid-flight becomes an Exchange that starts from the time the lane read it.
"""

from __future__ import annotations

import time
from time import perf_counter_ns
from typing import Any

from pyproxy.chain.api import loggable
from pyproxy.codec.events import RequestHead
from pyproxy.counters import FLAG_BASE, FLAG_INDEX, STAGES, account_response
from pyproxy.http.context import HttpContext


class RequestRecord:
    """The facts of one request and its one end (``account_end``)."""

    __slots__ = (
        "ctx",
        "request",
        "route",
        "target",
        "source",
        "started_ns",
        "started_wall",
        "timeout",
        "timeout_restarts",
        "deadline_key",
        "status",
        "flag",
        "trace",
        "bytes_in",
        "bytes_out",
        "admitted",
        "finished",
    )

    def __init__(self, ctx: HttpContext, request: RequestHead, trace: list[int] | None) -> None:
        self.ctx = ctx
        self.request = request
        self.route: Any = None  # a Route once one matched
        self.target: Any = None  # an Address once the route or the default picked one
        self.source = ""  # the source address to bind upstream ("" : any)
        self.started_ns = perf_counter_ns()
        self.started_wall = time.time()
        self.timeout = 0.0  # the armed route timeout (0: none)
        self.timeout_restarts = False  # each chunk restarts it (router.py's rule for streams)
        self.deadline_key: Any = None  # whose entry the armed timeout is (None: this record)
        self.status = 0
        self.flag = ""
        self.trace = trace
        self.bytes_in = self.bytes_out = 0
        self.admitted = False  # counted as pending by the worker's admission
        self.finished = False

    # ---- the route timeout (router.route_timeouts says which applies) ---------------

    def arm_timeout(self, timeout: float, restarts: bool, due: float | None = None) -> None:
        """Arm the route timeout: the whole response within it, or (``restarts``) no silence
        longer than it while the body still moves. ``due``: a deadline already running."""
        self.ctx.deadlines.arm(timeout, self, due=due)
        self.timeout = timeout
        self.timeout_restarts = restarts

    def restart_timeout(self) -> None:
        deadlines = self.ctx.deadlines
        deadlines.disarm(self.timeout, self.deadline_key or self)
        self.deadline_key = None
        deadlines.arm(self.timeout, self)

    def disarm_timeout(self) -> None:
        if self.timeout:
            self.ctx.deadlines.disarm(self.timeout, self.deadline_key or self)
            self.timeout = 0.0
            self.timeout_restarts = False

    def deadline_expired(self) -> None:  # the Deadlines' callback: Exchange says what it means
        raise NotImplementedError

    # ---- the end ---------------------------------------------------------------------

    def account_end(self, flag: str) -> int:
        """Count the finished request once: flag, status class, duration. Returns its duration."""
        self.finished = True
        self.flag = flag
        ctx = self.ctx
        if self.admitted:
            self.admitted = False
            ctx.admission.request_finished()
        self.disarm_timeout()
        block = ctx.block
        if flag:
            block[FLAG_BASE + FLAG_INDEX[flag]] += 1
        elapsed = perf_counter_ns() - self.started_ns
        account_response(block, self.status, elapsed)
        return elapsed

    def log_record(self, protocol: str, elapsed_ns: int, metadata: dict | None, grpc: Any) -> dict:
        """The access log's line for this request (access_log.py writes it)."""
        request = self.request
        record = {
            "time": round(self.started_wall, 6),
            "method": request.method.decode("latin-1"),
            "authority": authority_of(request).decode("latin-1"),
            "path": request.target.decode("latin-1"),
            "protocol": protocol,
            "status": self.status,
            "response_flags": self.flag or "-",
            "bytes_received": self.bytes_in,
            "bytes_sent": self.bytes_out,
            "duration_ms": round(elapsed_ns / 1e6, 3),
            "upstream_host": str(self.target) if self.target is not None else None,
        }
        if grpc is not None:
            grpc.log_fields(record)
        if metadata:  # Envoy's dynamic metadata, as filters set it
            record["dynamic_metadata"] = loggable(metadata)
        if self.trace is not None:
            record["stages_us"] = {
                name: round(self.trace[i] / 1000, 2)
                for i, name in enumerate(STAGES)
                if self.trace[i]
            }
        return record


def authority_of(request: RequestHead) -> bytes:
    return authority_in(request.headers)


def authority_in(headers) -> bytes:
    for name, value in headers:
        if name == b"host" or name == b":authority":
            return value
    return b""
