"""What both ends of an HTTP/1.1 hop share: codec calls, timed into the `parse` stage."""

from __future__ import annotations

from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyproxy.counters import PARSE

if TYPE_CHECKING:
    from pyproxy.codec.http1 import Http1Codec
    from pyproxy.http.context import HttpContext
    from pyproxy.io.stream import Stream


class Http1Side:
    """Mixin for the downstream session and the upstream connection (each has ctx, codec, stream)."""

    __slots__ = ()
    ctx: HttpContext
    codec: Http1Codec
    stream: Stream

    # HttpContext.account_parse, inlined: these run several times per request.

    def decode(self, data) -> list:
        """Bytes from the peer → events (PAUSED last when the codec holds input back)."""
        ctx = self.ctx
        if not ctx.timed:
            return self.codec.receive_data(data)
        t0 = perf_counter_ns()
        events = self.codec.receive_data(data)
        elapsed = perf_counter_ns() - t0
        block = ctx.block
        block[ctx.parse_ns] += elapsed
        block[ctx.parse_events] += 1
        trace = self.stream.trace
        if trace is not None:
            trace[PARSE] += elapsed
        return events

    def encode(self, event, body=None) -> None:
        """One event → bytes on the wire (queued or corked by the stream as needed).

        With ``body`` (maybe empty), ``event`` is a head and the whole message goes at once.
        """
        ctx = self.ctx
        if ctx.timed:
            t0 = perf_counter_ns()
            data = self.codec.send(event) if body is None else self.codec.send_message(event, body)
            elapsed = perf_counter_ns() - t0
            block = ctx.block
            block[ctx.parse_ns] += elapsed
            block[ctx.parse_events] += 1
            trace = self.stream.trace
            if trace is not None:
                trace[PARSE] += elapsed
        else:
            data = self.codec.send(event) if body is None else self.codec.send_message(event, body)
        if data:
            self.stream.write(data)
