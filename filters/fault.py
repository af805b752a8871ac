"""The fault filter: inject delays and aborts (fixed or header-driven), Envoy's fault filter semantics.

Config (Envoy's field names; percentages 0–100, durations like "10ms"):

    delay:  {fixed_delay: 50ms, percentage: 10, header_delay: false}
    abort:  {http_status: 503, grpc_status: 14, percentage: 5, header_abort: false}
    max_active_faults: 100

With `header_delay` / `header_abort` the request may ask for a fault itself
(`x-envoy-fault-delay-request: <ms>`, `x-envoy-fault-abort-request: <status>`,
`x-envoy-fault-abort-grpc-request: <code>`, and the `...-percentage` variants);
those headers are ignored unless enabled. TCP mode: `delay` holds a new
connection before it is connected upstream, `abort` resets it.
"""

from __future__ import annotations

import random

from pyproxy.chain.api import (
    CONTINUE,
    STOP,
    FilterConfigError,
    FilterFactory,
    HttpFilter,
    TcpFilter,
)
from pyproxy.config import ListenerMode
from pyproxy.durations import parse_duration

DELAY_HEADER = b"x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = b"x-envoy-fault-delay-request-percentage"
ABORT_HEADER = b"x-envoy-fault-abort-request"
ABORT_GRPC_HEADER = b"x-envoy-fault-abort-grpc-request"
ABORT_PERCENT_HEADER = b"x-envoy-fault-abort-request-percentage"

DELAYS, ABORTS, OVERFLOWS, ACTIVE = range(4)


def _percentage(section: dict, where: str) -> float:
    value = section.pop("percentage", 100)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise FilterConfigError(f"{where}.percentage", "expected a number 0–100")
    return float(value)


def _flag(section: dict, key: str, where: str) -> bool:
    value = section.pop(key, False)
    if value == {}:  # Envoy writes `header_abort: {}`
        return True
    if not isinstance(value, bool):
        raise FilterConfigError(f"{where}.{key}", "expected true or false")
    return value


def _leftover(section: dict, where: str) -> None:
    if section:
        raise FilterConfigError(f"{where}.{next(iter(section))}", "unknown field")


class FaultFactory(FilterFactory):
    name = "fault"
    modes = ("http", "grpc", "tcp")
    counter_names = ("delays_injected", "aborts_injected", "faults_overflow", "active_faults")

    @classmethod
    def validate(cls, config: dict) -> dict:
        out: dict = {"delay": None, "abort": None, "max_active_faults": None}
        delay = config.pop("delay", None)
        if delay is not None:
            if not isinstance(delay, dict):
                raise FilterConfigError("delay", "expected a mapping")
            delay = dict(delay)
            fixed = delay.pop("fixed_delay", None)
            try:
                seconds = parse_duration(fixed) if fixed is not None else None
            except ValueError as exc:
                raise FilterConfigError("delay.fixed_delay", str(exc)) from None
            header = _flag(delay, "header_delay", "delay")
            if seconds is None and not header:
                raise FilterConfigError("delay.fixed_delay", "required (or header_delay: true)")
            out["delay"] = {
                "seconds": seconds,
                "percentage": _percentage(delay, "delay"),
                "header": header,
            }
            _leftover(delay, "delay")
        abort = config.pop("abort", None)
        if abort is not None:
            if not isinstance(abort, dict):
                raise FilterConfigError("abort", "expected a mapping")
            abort = dict(abort)
            status = abort.pop("http_status", None)
            if status is not None and (
                isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599
            ):
                raise FilterConfigError("abort.http_status", "expected an HTTP status 200–599")
            grpc_status = abort.pop("grpc_status", None)
            if grpc_status is not None and (
                isinstance(grpc_status, bool)
                or not isinstance(grpc_status, int)
                or not 0 <= grpc_status <= 16
            ):
                raise FilterConfigError("abort.grpc_status", "expected a gRPC status code 0–16")
            header = _flag(abort, "header_abort", "abort")
            if status is None and grpc_status is None and not header:
                raise FilterConfigError(
                    "abort.http_status", "required (or grpc_status, or header_abort: true)"
                )
            out["abort"] = {
                "http_status": status,
                "grpc_status": grpc_status,
                "percentage": _percentage(abort, "abort"),
                "header": header,
            }
            _leftover(abort, "abort")
        limit = config.pop("max_active_faults", None)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise FilterConfigError("max_active_faults", "expected a non-negative integer")
        out["max_active_faults"] = limit
        _leftover(config, "")
        if out["delay"] is None and out["abort"] is None:
            raise FilterConfigError("delay", "configure delay, abort, or both")
        return out

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        self.delay = delay = config["delay"]
        self.abort = abort = config["abort"]
        # Flattened for the per-request decision (no dict lookups on the hot path).
        self.delay_seconds = delay["seconds"] if delay else None
        self.delay_percentage = delay["percentage"] if delay else 0.0
        self.delay_header = bool(delay and delay["header"])
        self.abort_status = abort["http_status"] if abort else None
        self.abort_grpc_status = abort["grpc_status"] if abort else None
        self.abort_percentage = abort["percentage"] if abort else 0.0
        self.abort_header = bool(abort and abort["header"])
        self.max_active = config["max_active_faults"]
        self.active = 0
        self.grpc = context.mode == ListenerMode.GRPC
        self.random = random.random

    def create(self) -> FaultFilter:
        return FaultFilter(self)

    def create_tcp(self) -> TcpFault:
        return TcpFault(self)

    def admit(self) -> bool:
        """Respect max_active_faults: a fault past the cap is skipped and counted."""
        if self.max_active is not None and self.active >= self.max_active:
            self.counters[OVERFLOWS] += 1
            return False
        return True

    def roll(self, percentage: float) -> bool:
        return percentage >= 100 or self.random() * 100 < percentage


def _header_number(headers, name: bytes) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class FaultFilter(HttpFilter):
    """The decision, per request; no per-request state unless a delay fires (then a _Delay holds it)."""

    shared = (
        True  # one instance per worker: most requests get no fault and need nothing of their own
    )
    __slots__ = ("factory", "callbacks")

    def __init__(self, factory: FaultFactory) -> None:
        self.factory = factory

    def decode_headers(self, headers, end_stream: bool) -> int:
        factory = self.factory
        abort = self._abort_decision(headers) if factory.abort is not None else None
        delay = self._delay_decision(headers) if factory.delay is not None else 0.0
        if abort is None and not delay:
            return CONTINUE
        if not factory.admit():
            return CONTINUE
        callbacks = self.callbacks
        if delay:
            held = _Delay(factory, callbacks, abort, delay)
            callbacks.defer_cleanup(self, held.end)
            return STOP
        assert abort is not None  # no delay: an abort was decided
        _abort(factory, callbacks, abort)
        return STOP

    def _delay_decision(self, headers) -> float:
        factory = self.factory
        seconds = factory.delay_seconds
        percentage = factory.delay_percentage
        if factory.delay_header:
            ms = _header_number(headers, DELAY_HEADER)
            if ms is not None and ms >= 0:
                seconds = ms / 1000
            pct = _header_number(headers, DELAY_PERCENT_HEADER)
            if pct is not None:
                percentage = min(max(pct, 0.0), 100.0)
        if not seconds or not factory.roll(percentage):
            return 0.0
        return seconds

    def _abort_decision(self, headers) -> tuple[int, int | None] | None:
        factory = self.factory
        status = factory.abort_status
        grpc_status = factory.abort_grpc_status
        percentage = factory.abort_percentage
        if factory.abort_header:
            asked = _header_number(headers, ABORT_HEADER)
            if asked is not None and 200 <= asked <= 599:
                status = int(asked)
            asked_grpc = _header_number(headers, ABORT_GRPC_HEADER)
            if asked_grpc is not None and 0 <= asked_grpc <= 16:
                grpc_status = int(asked_grpc)
            pct = _header_number(headers, ABORT_PERCENT_HEADER)
            if pct is not None:
                percentage = min(max(pct, 0.0), 100.0)
        if status is None and grpc_status is None:
            return None
        if not factory.roll(percentage):
            return None
        return (status or 503, grpc_status)


def _abort(factory: FaultFactory, callbacks, decision: tuple[int, int | None]) -> None:
    status, grpc_status = decision
    factory.counters[ABORTS] += 1
    callbacks.send_local_reply(status, b"fault filter abort\n", grpc_status=grpc_status, flag="FI")


class _Delay:
    """One request held by an injected delay: its timer and its place under max_active_faults."""

    __slots__ = ("factory", "callbacks", "abort", "timer", "holding")

    def __init__(
        self, factory: FaultFactory, callbacks, abort: tuple[int, int | None] | None, seconds: float
    ) -> None:
        self.factory = factory
        self.callbacks = callbacks
        self.abort = abort
        factory.counters[DELAYS] += 1
        factory.active += 1
        factory.counters[ACTIVE] += 1
        self.holding = True
        self.timer = callbacks.loop.call_later(seconds, self._over)

    def _over(self) -> None:
        self.timer = None
        self._release()
        if self.abort is not None:
            _abort(self.factory, self.callbacks, self.abort)
        else:
            self.callbacks.continue_decoding()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.factory.active -= 1
            self.factory.counters[ACTIVE] -= 1

    def end(self) -> None:
        """The request ended (completed, reset or answered): stop the timer, leave the active count."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._release()


class TcpFault(TcpFilter):
    """TCP mode: hold the new connection for the delay, or reset it."""

    def __init__(self, factory: FaultFactory) -> None:
        self.factory = factory

    def on_new_connection(self, conn) -> int:
        factory = self.factory
        abort = factory.abort is not None and factory.roll(factory.abort["percentage"])
        delay = (
            factory.delay is not None
            and factory.delay["seconds"]
            and factory.roll(factory.delay["percentage"])
        )
        if (abort or delay) and not factory.admit():
            return CONTINUE
        if abort:
            factory.counters[ABORTS] += 1
            conn.close(reset=True, flag="FI")
            return STOP
        if delay:
            factory.counters[DELAYS] += 1
            factory.active += 1
            factory.counters[ACTIVE] += 1

            def resume() -> None:
                factory.active -= 1
                factory.counters[ACTIVE] -= 1
                conn.continue_connecting()

            conn.loop.call_later(factory.delay["seconds"], resume)
            return STOP
        return CONTINUE


FaultFactory.filter_class = FaultFilter
FaultFactory.tcp_filter_class = TcpFault
