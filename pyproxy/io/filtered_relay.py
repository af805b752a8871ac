"""TCP-mode filters that watch the byte stream: the relay reads through a socket wrapper that calls them.

Only listeners whose TCP filters define `on_data` / `on_close` get this; the
plain relay's per-read path is untouched. A hook runs right after each recv
(and once with end_stream at EOF); its time is charged to its `filter:<name>`
stage and taken back out of the read/ipc stage that the recv timing wrapped.
"""

from __future__ import annotations

import socket
from time import perf_counter_ns

from pyproxy.io.relay import Relay


class _WatchedSocket:
    """Looks like the socket to the relay; calls the filters on what each recv_into brought."""

    __slots__ = ("_sock", "_hooks", "_from_downstream", "_block", "_timed", "_read_ns")

    def __init__(
        self,
        sock: socket.socket,
        hooks: list,
        from_downstream: bool,
        block,
        timed: bool,
        read_ns: int,
    ) -> None:
        self._sock = sock
        self._hooks = hooks  # [(on_data, stage_ns, stage_events)]
        self._from_downstream = from_downstream
        self._block = block
        self._timed = timed
        self._read_ns = read_ns

    def recv_into(self, buf) -> int:
        n = self._sock.recv_into(buf)
        data = memoryview(buf)[:n]
        block = self._block
        for on_data, stage_ns, stage_events in self._hooks:
            if self._timed:
                t0 = perf_counter_ns()
                on_data(data, self._from_downstream, n == 0)
                spent = perf_counter_ns() - t0
                block[stage_ns] += spent
                block[stage_events] += 1
                block[self._read_ns] -= spent
            else:
                on_data(data, self._from_downstream, n == 0)
        return n

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class TellsFiltersClosed(Relay):
    """A relay whose TCP filters hear its end (on_close)."""

    __slots__ = ("_filters",)
    _filters: list

    def close(self, flag: str = "", reset: bool = False) -> None:
        already = self._closed
        super().close(flag, reset)
        if not already:
            filters_closed(self._filters, flag)


def filters_closed(filters: list, flag: str) -> None:
    """A connection ended (its relay closed, or it ended before one started: refused, or its
    upstream connect failed): the filters that hear the end hear it."""
    for f in filters:
        on_close = getattr(f, "on_close", None)
        if on_close is not None:
            on_close(flag)


class FilteredRelay(TellsFiltersClosed):
    """A copy relay whose sources are watched by TCP filters (on_data) and whose end they hear (on_close)."""

    __slots__ = ()

    def __init__(self, *args, filters: list, stages: list, **kwargs) -> None:
        self._filters = filters
        data_hooks = [
            (f.on_data, stage_ns, stage_events)
            for f, (stage_ns, stage_events) in zip(filters, stages, strict=True)
            if getattr(f, "on_data", None) is not None
        ]
        super().__init__(*args, **kwargs)
        if data_hooks:
            for direction in (self._request, self._response):
                from_downstream = direction.is_request
                # Duck-typed on purpose: the relay only calls recv_into/fileno/shutdown on it.
                direction.src = _WatchedSocket(  # type: ignore[assignment]
                    direction.src,
                    data_hooks,
                    from_downstream,
                    self.block,
                    self.timed,
                    direction.read_ns,
                )
