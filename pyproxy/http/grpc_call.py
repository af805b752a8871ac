"""One gRPC call riding an Exchange: method, messages per direction, status, deadline, gRPC-shaped local replies.

The exchange relays the call's HTTP/2 stream as it would any other; this
object watches it. Each DATA chunk goes through a MessageScanner per
direction before it is forwarded (timed as `parse`), so a bad flag or an
oversized message is caught before a byte of it reaches the other side.
Whatever the sidecar answers itself becomes a trailers-only response, the
one shape every gRPC client reads as a status.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import Protocol

from pyproxy.codec.events import RequestHead, ResponseHead
from pyproxy.codec.grpc import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    HTTP_TO_GRPC,
    INTERNAL,
    STATUS_NAMES,
    UNAVAILABLE,
    UNKNOWN,
    FramingError,
    MessageScanner,
    is_grpc,
    method_of,
    parse_timeout,
    percent_encode,
    status_from_headers,
    trailers_only_headers,
)
from pyproxy.counters import reject_slot
from pyproxy.grpc_metrics import E_STARTED, GrpcMethodTable, record_finished
from pyproxy.http.context import HttpContext
from pyproxy.http.seams import Downstream


class Exchange(Protocol):
    """The exchange a call rides, as the call sees it."""

    ctx: HttpContext
    request: RequestHead
    downstream: Downstream
    trace: list[int] | None
    status: int

    def fail_call(self, grpc_status: int, message: str, flag: str) -> None: ...


# How a call that ended without a grpc-status of its own is counted (and answered, for local replies).
_FLAG_STATUS = {
    "DR": CANCELLED,  # the caller reset the stream
    "UT": DEADLINE_EXCEEDED,
    "UF": UNAVAILABLE,
    "UC": UNAVAILABLE,
    "UR": UNAVAILABLE,
    "LR": UNAVAILABLE,
    "UPE": INTERNAL,
    "DPE": INTERNAL,
}
_OK_HEAD = b"OK"
REJECT_GRPC_FRAMING = reject_slot("grpc_framing")
HTTP1_REFUSED = b"this is a gRPC listener: it speaks HTTP/2 only (h2c with prior knowledge)\n"


def wants_call(exchange: Exchange) -> bool:
    """Is this exchange a gRPC call? Every HTTP/2 request on a grpc listener, and application/grpc ones."""
    if exchange.downstream.protocol != "HTTP/2":
        return False
    if exchange.ctx.grpc_only:
        return True
    for name, value in exchange.request.headers:
        if name == b"content-type":
            return is_grpc(value)
    return False


def method_table(ctx) -> GrpcMethodTable:
    """One table per listener context (a context belongs to one worker and one listener block)."""
    table = getattr(ctx, "grpc_methods", None)
    if table is None:
        table = ctx.grpc_methods = GrpcMethodTable(ctx.block)
    return table


class GrpcCall:
    __slots__ = (
        "exchange",
        "method",
        "entry",
        "requests",
        "responses",
        "status",
        "message",
        "deadline_armed",
    )

    def __init__(self, exchange: Exchange, started_ns: int = 0) -> None:
        self.exchange = exchange
        ctx = exchange.ctx
        request = exchange.request
        self.method = method_of(request.target)
        self.entry = method_table(ctx).entry(self.method)
        ctx.block[self.entry + E_STARTED] += 1
        limits = ctx.listener.grpc
        self.requests = MessageScanner(limits.max_request_message_bytes)
        self.responses = MessageScanner(limits.max_response_message_bytes)
        self.status: int | None = None
        self.message = b""
        self.deadline_armed = False
        for name, value in request.headers:
            if name == b"grpc-timeout":
                timeout = parse_timeout(value)
                # The header goes on to the app unchanged; the sidecar enforces it as well, so a
                # call stuck anywhere behind it still ends on time with a status.
                if timeout is not None:
                    # On the context's deadlines, not a loop timer per call (deadlines.py).
                    # A call the gRPC lane read earlier (started_ns) is due from then.
                    if started_ns:
                        timeout -= (perf_counter_ns() - started_ns) / 1e9
                    ctx.deadlines.arm_at(ctx.loop.time() + timeout, self)
                    self.deadline_armed = True
                break

    # ---- messages (the parse stage) --------------------------------------------------------

    def request_data(self, data) -> bool:
        """Scan a request chunk; False when the call was ended for bad framing (drop the chunk)."""
        return self._scan(self.requests, data, "DPE")

    def response_data(self, data) -> bool:
        return self._scan(self.responses, data, "UPE")

    def _scan(self, scanner: MessageScanner, data, flag: str) -> bool:
        ctx = self.exchange.ctx
        if not ctx.timed:
            try:
                scanner.feed(data)
            except FramingError as exc:
                self._framing_failed(exc, flag)
                return False
            return True
        t0 = perf_counter_ns()
        try:
            scanner.feed(data)
        except FramingError as exc:
            self.exchange.ctx.account_parse(perf_counter_ns() - t0, self.exchange.trace)
            self._framing_failed(exc, flag)
            return False
        self.exchange.ctx.account_parse(perf_counter_ns() - t0, self.exchange.trace)
        return True

    def request_ended(self) -> bool:
        return self._finish_scan(self.requests, "DPE")

    def response_ended(self) -> bool:
        return self._finish_scan(self.responses, "UPE")

    def _finish_scan(self, scanner: MessageScanner, flag: str) -> bool:
        try:
            scanner.finish()
        except FramingError as exc:
            self._framing_failed(exc, flag)
            return False
        return True

    def _framing_failed(self, exc: FramingError, flag: str) -> None:
        if flag == "DPE":  # the caller's messages, not the app's
            self.exchange.ctx.block[REJECT_GRPC_FRAMING] += 1
        self.exchange.fail_call(exc.status, str(exc), flag)

    @property
    def response_at_boundary(self) -> bool:
        return self.responses.at_boundary

    # ---- status --------------------------------------------------------------------------

    def response_headers(self, headers) -> None:
        """A response head or trailers: a grpc-status here is the call's status."""
        status, message = status_from_headers(headers)
        if status is not None:
            self.status, self.message = status, message

    def deadline_expired(self) -> None:
        self.deadline_armed = False
        self.exchange.fail_call(DEADLINE_EXCEEDED, "deadline exceeded at the sidecar", "UT")

    def local_reply_head(
        self, http_status: int, flag: str, grpc_status: int | None, message: str, extra: list | None
    ) -> ResponseHead:
        """A reply of ours as trailers-only: HTTP 200, application/grpc, grpc-status, grpc-message."""
        if grpc_status is None:
            # A route timeout is the call's deadline as far as the caller can tell.
            grpc_status = (
                DEADLINE_EXCEEDED if flag == "UT" else HTTP_TO_GRPC.get(http_status, UNKNOWN)
            )
        self.status, self.message = grpc_status, percent_encode(message)
        headers = trailers_only_headers(grpc_status, message)
        if extra:
            # A filter's headers go along, but the content-type must stay application/grpc.
            headers.extend(item for item in extra if item[0] != b"content-type")
        return ResponseHead(200, _OK_HEAD, headers)

    def status_trailers(self, grpc_status: int, message: str) -> list:
        """Trailers that end a call whose response already started (its messages so far are whole)."""
        self.status, self.message = grpc_status, percent_encode(message)
        return trailers_only_headers(grpc_status, message)[1:]

    # ---- end -----------------------------------------------------------------------------

    def finished(self, flag: str, elapsed_ns: int) -> None:
        if self.deadline_armed:
            self.deadline_armed = False
            self.exchange.ctx.deadlines.disarm_at(self)
        status = self.status
        if status is None:
            status = _FLAG_STATUS.get(flag) if flag else None
            if status is None:
                http = self.exchange.status
                status = UNKNOWN if http == 200 or not http else HTTP_TO_GRPC.get(http, UNKNOWN)
            self.status = status
        elif not 0 <= status < len(STATUS_NAMES):
            status = UNKNOWN  # the access log keeps the code as sent; the metric slot cannot
        record_finished(
            self.exchange.ctx.block,
            self.entry,
            status,
            elapsed_ns,
            self.requests.messages,
            self.responses.messages,
        )

    def log_fields(self, record: dict) -> None:
        record["grpc_method"] = self.method
        record["grpc_status"] = self.status
        record["grpc_message"] = self.message.decode("latin-1")
        record["grpc_messages_received"] = self.requests.messages
        record["grpc_messages_sent"] = self.responses.messages
