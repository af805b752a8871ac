"""TCP-mode filters that edit or hold the byte stream: each read passes through them before it is written.

Only listeners with such a filter (one defining `on_stream`, see chain/api.py's TcpFilter) get
this relay; watch-only filters keep io/filtered_relay.py, no filters the plain relay. Per read:
recv, then the filters in chain order (each `on_stream(data, from_downstream, end_stream)`
returns what goes on: None for the data as it came, b"" to hold it), then the write, parked
with a buffer of its own when the destination does not take it all, as in io/relay.py. A
filter that held bytes hands them on later with `release`; a source that ended while a filter
still holds bytes has its FIN passed on only once they are written. Each filter's time is
charged to its `filter:<name>` stage.
"""

from __future__ import annotations

from time import perf_counter_ns

from pyproxy.io.filtered_relay import TellsFiltersClosed
from pyproxy.io.relay import NOTIFY_EVENTS, _Direction


class _EditingDirection(_Direction):
    """One way of the relay, its reads passed through the filters before they are written."""

    __slots__ = ("shutdown_after",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_after = False  # the source ended: FIN once the parked bytes are written

    def on_readable(self) -> None:
        relay = self.relay
        assert isinstance(relay, EditingRelay), "built by EditingRelay only"
        assert self.pool is not None, "the editing relay always has buffers"
        t0 = perf_counter_ns() if relay.timed else 0
        buf, view = self.pool.top()
        n = self._read(buf)
        if n < 0:
            return
        if n == 0:
            self._ended(t0)
            return
        self._received(n, t0)
        data = view[:n]
        out = relay.pass_through(0, data, self.is_request, False)
        if relay._closed:
            return
        if out is None:
            self.write(data, pooled=True)
        elif out:
            self.write(out, pooled=False)

    def _read(self, buf) -> int:
        """recv into `buf`: the bytes read (0 at EOF), or -1 when none came or the source failed."""
        try:
            return self.src.recv_into(buf)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                self.relay.reset_by(self.src_side)
            return -1

    def _ended(self, t0: int) -> None:
        """EOF from the source: the filters hear it (and may let go of what they held), then
        the FIN goes on once whatever they let go of is written."""
        relay = self.relay
        assert isinstance(relay, EditingRelay), "built by EditingRelay only"
        if relay.timed:
            block = relay.block
            block[self.read_ns] += perf_counter_ns() - t0
            block[self.read_events] += 1
            block[NOTIFY_EVENTS] += 1
        self.eof = True
        self._stop_reading()
        out = relay.pass_through(0, b"", self.is_request, True)
        if relay._closed:
            return
        if out:
            self.write(out, pooled=False)
        if relay.holds(self.is_request) or self.view is not None:
            self.shutdown_after = True
        else:
            self._shutdown_dst()

    def write(self, data, pooled: bool) -> None:
        """Send `data` on; what the destination does not take is parked (`pooled`: data is a
        view of the pool's top buffer, which is then kept; else data is owned bytes)."""
        relay = self.relay
        if self.view is not None:  # already parked: queue behind it (reading is stopped)
            rest = bytes(self.view[self.start : self.end]) + bytes(data)
            self.release()
            self.view, self.start, self.end = memoryview(rest), 0, len(rest)
            return
        t0 = perf_counter_ns() if relay.timed else 0
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            relay.reset_by(self.dst_side)
            return
        self._sent(sent, t0, False)
        if sent < len(data):
            if pooled:
                assert self.pool is not None
                self.held = self.pool.take()
            self.view = memoryview(data)
            self.start, self.end = sent, len(data)
            loop = relay.loop
            if not self.eof:
                loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)

    def drained(self) -> None:
        """The parked bytes are written: the FIN a filter kept back follows, or reading resumes."""
        relay = self.relay
        assert isinstance(relay, EditingRelay), "built by EditingRelay only"
        if self.shutdown_after:
            if not relay.holds(self.is_request):
                self.shutdown_after = False
                self._shutdown_dst()
        elif not self.eof:
            self.arm_reader()

    def released(self, data: bytes) -> None:
        """A filter let go of bytes it held: written now; a pending FIN follows them."""
        if data:
            self.write(data, pooled=False)
        if self.relay._closed:
            return
        relay = self.relay
        assert isinstance(relay, EditingRelay), "built by EditingRelay only"
        if self.shutdown_after and self.view is None and not relay.holds(self.is_request):
            self.shutdown_after = False
            self._shutdown_dst()


class EditingRelay(TellsFiltersClosed):
    """A copy relay whose reads pass through TCP filters that may edit or hold them."""

    __slots__ = ("_stages",)

    def __init__(self, *args, filters: list, stages: list, **kwargs) -> None:
        self._filters = filters
        self._stages = stages
        super().__init__(*args, **kwargs)
        for f in filters:
            if getattr(f, "on_stream", None) is not None:
                f.stream = self  # for release() and close() from the filter

    def _directions(self, buffer_size: int, app_side: str):
        down, up = self.downstream, self.upstream
        return (
            _EditingDirection(self, down, up, buffer_size, "downstream", app_side),
            _EditingDirection(self, up, down, buffer_size, "upstream", app_side),
        )

    def pass_through(self, first: int, data, from_downstream: bool, end_stream: bool):
        """Filters from index `first` on see `data`: what goes on (None: `data` as it came)."""
        out = None
        block, timed = self.block, self.timed
        for index in range(first, len(self._filters)):
            f = self._filters[index]
            hook = getattr(f, "on_stream", None)
            watch = getattr(f, "on_data", None) if hook is None else None
            if hook is None and watch is None:
                continue
            t0 = perf_counter_ns() if timed else 0
            if hook is not None:
                result = hook(data, from_downstream, end_stream)
                if result is not None:
                    data = out = result
            elif watch is not None:
                watch(data, from_downstream, end_stream)
            if timed:
                stage_ns, stage_events = self._stages[index]
                block[stage_ns] += perf_counter_ns() - t0
                block[stage_events] += 1
            if self._closed or (not data and not end_stream):
                break  # held (or the connection ended): nothing for the filters after it
        return out

    def holds(self, from_downstream: bool) -> bool:
        """Some filter still holds bytes (or has paused) this direction."""
        return any(
            getattr(f, "holding", None) is not None and f.holding(from_downstream)
            for f in self._filters
        )

    def release(self, f, data: bytes, from_downstream: bool) -> None:
        """Filter `f` lets go of bytes it held: the filters after it see them, then they are written."""
        if self._closed:
            return
        index = self._filters.index(f)
        out = self.pass_through(index + 1, data, from_downstream, False)
        direction = self._request if from_downstream else self._response
        assert isinstance(direction, _EditingDirection)
        direction.released(data if out is None else out)
