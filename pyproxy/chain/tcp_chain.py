"""TCP-mode filters at connection open: each may let the connection on, hold it (delay) or refuse it."""

from __future__ import annotations

import socket
from time import perf_counter_ns

from pyproxy.chain.api import CONTINUE, FactoryContext
from pyproxy.chain.registry import factory_class
from pyproxy.config import FilterSpec
from pyproxy.counters import FILTER_STAGE_BASE, STAGE_EVENTS, STAGE_NS
from pyproxy.io.filtered_relay import filters_closed
from pyproxy.io.sockets import abort


class TcpChainFactory:
    """Built once per worker for a tcp-mode listener with filters."""

    def __init__(
        self, specs: tuple[FilterSpec, ...], context: FactoryContext, slot_of: dict[str, int]
    ) -> None:
        self.factories = []
        self.stages = []
        for spec in specs:
            context.filter_name = spec.name
            factory = factory_class(spec.type)(spec.config, context)
            if factory.supports_tcp():
                self.factories.append(factory)
                slot = FILTER_STAGE_BASE + slot_of[spec.name]
                self.stages.append((STAGE_NS + slot, STAGE_EVENTS + slot))

        # Only a chain with stream hooks pays for the watched relay.
        classes = [type(factory.create_tcp()) for factory in self.factories]
        self.watches_stream = any(
            getattr(cls, "on_data", None) is not None or getattr(cls, "on_close", None) is not None
            for cls in classes
        )
        # Only a chain with a filter that edits or holds the stream pays for the editing relay.
        self.edits_stream = any(getattr(cls, "on_stream", None) is not None for cls in classes)

    def close(self) -> None:
        for factory in self.factories:
            factory.close()


class ConnectionGate:
    """One new connection passing the TCP filters; the listener connects upstream once all agree."""

    __slots__ = (
        "chain",
        "listener",
        "downstream",
        "target",
        "source",
        "started_ns",
        "position",
        "closed",
        "loop",
        "filters",
    )

    def __init__(
        self,
        chain: TcpChainFactory,
        listener,
        downstream: socket.socket,
        target,
        source: str,
        started_ns: int,
    ) -> None:
        self.chain = chain
        self.listener = listener
        self.loop = listener.loop
        self.downstream = downstream
        self.target, self.source = target, source
        self.started_ns = started_ns
        self.position = 0
        self.closed = False
        self.filters = [factory.create_tcp() for factory in chain.factories]

    def run(self, position: int = 0) -> None:
        block = self.listener.block
        timed = self.listener.timed
        for index in range(position, len(self.filters)):
            hook = getattr(self.filters[index], "on_new_connection", None)
            if hook is None:
                continue
            if timed:
                t0 = perf_counter_ns()
                status = hook(self)
                stage_ns, stage_events = self.chain.stages[index]
                block[stage_ns] += perf_counter_ns() - t0
                block[stage_events] += 1
            else:
                status = hook(self)
            if self.closed:
                return
            if status != CONTINUE:
                self.position = index
                return
        self.listener.connections.discard(self)
        watching = self.chain.watches_stream
        self.listener.connect_upstream(
            self.downstream,
            self.target,
            self.source,
            self.started_ns,
            self.filters if watching else None,
        )

    def continue_connecting(self) -> None:
        if not self.closed:
            self.run(self.position + 1)

    def close(self, flag: str = "LR", reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.listener.connections.discard(self)
        filters_closed(self.filters, flag)
        if reset:
            self.listener.fail(_Aborted(self.downstream), flag, self.started_ns)
        else:
            self.listener.fail(self.downstream, flag, self.started_ns)


class _Aborted:
    """Makes the listener's close of a refused connection send RST instead of FIN."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        abort(self.sock)
