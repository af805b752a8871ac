"""A worker: one event loop serving every listener; applies config, drains on request."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time

from pyproxy import guest_metrics
from pyproxy.admission import Admission
from pyproxy.config import ListenerConfig, ProxyConfig
from pyproxy.counters import (
    W_DRAINING,
    W_NOTIFY_COST_NS,
    W_PID,
    W_READY,
    W_STARTED_NS,
    CounterStore,
)
from pyproxy.io.notify import calibrate_notify_cost
from pyproxy.listener import Listener, start_draining
from pyproxy.memory_trim import Trimmer, trim

log = logging.getLogger("pyproxy.worker")


class Worker:
    def __init__(self, index: int, store: CounterStore) -> None:
        self.index = index
        self.store = store
        self.header = store.worker_header(index)
        guest_metrics.bind(store.guest_metrics.worker(index))
        self.listeners: dict[str, Listener] = {}
        self.connections: set = set()
        self.config: ProxyConfig | None = None
        self.admission: Admission | None = None
        self.draining = False
        self._stopped: asyncio.Future | None = None
        self._trimmer: Trimmer | None = None

    async def start(self, config: ProxyConfig, slots: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        header = self.header
        header[W_PID] = os.getpid()
        header[W_STARTED_NS] = time.time_ns()
        header[W_NOTIFY_COST_NS] = await calibrate_notify_cost()
        self.apply(config, slots)
        assert self.admission is not None
        self._trimmer = Trimmer(loop, self.admission, header)
        # Startup objects live forever: keep them out of every later GC pass.
        gc.freeze()
        # Imports and config building leave freed scratch (compiler arenas, dataclass code) in the
        # heap: hand it back before serving (about 1.5 MB of an idle worker's RSS).
        trim()
        header[W_READY] = 1

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped

    def apply(self, config: ProxyConfig, slots: dict[str, int]) -> None:
        """Move to a new config: keep listeners whose addresses are unchanged, rebind the rest.

        New sockets are bound before old ones close, so a failed bind leaves the
        old listeners serving (an unchanged address is briefly bound twice with
        SO_REUSEPORT, which only splits new connections between the two). HTTP connections
        open before a reload are drained onto the new config (``_drain_onto_new_config``).
        """
        loop = asyncio.get_running_loop()
        if self.admission is None:
            self.admission = Admission(self.connections, config)
        else:
            self.admission.apply(config)
        before = list(self.connections)
        wanted = {listener.name: listener for listener in config.listeners}
        started: dict[str, Listener] = {}
        try:
            for name, lconf in wanted.items():
                current = self.listeners.get(name)
                if current is not None and _same_sockets(current.config, lconf):
                    continue
                block = self.store.listener_block(self.index, slots[name])
                listener = Listener(
                    loop, lconf, block, config.stage_clock, self.connections, config,
                    self.admission,
                )  # fmt: skip
                started[name] = listener
                listener.start()
        except OSError:
            for listener in started.values():
                listener.stop_accepting()
            raise
        for name, listener in list(self.listeners.items()):
            if name not in wanted or name in started:
                listener.stop_accepting()
                del self.listeners[name]
            else:
                listener.timed = config.stage_clock
                listener.proxy_config = config
                listener.update(wanted[name])
        self.listeners.update(started)
        reloaded = self.config is not None
        self.config = config
        if reloaded:
            self._drain_onto_new_config(before, config.drain_timeout)

    def _drain_onto_new_config(self, connections: list, bound: float) -> None:
        """HTTP connections keep the filters and upstreams they started with, so a reload asks
        them to close after their current response (HTTP/1 ``Connection: close``, HTTP/2 GOAWAY)
        and the clients reconnect onto the new config; whatever is still open after ``bound``
        seconds is closed. TCP relays carry on: their bytes have no request boundary to stop at."""
        draining = start_draining(connections)
        if draining:
            asyncio.get_running_loop().call_later(bound, self._close_leftovers, draining)

    def _close_leftovers(self, connections: list) -> None:
        for connection in connections:
            if connection in self.connections:
                connection.close("LR")

    def stop_accepting(self) -> None:
        self.draining = True
        self.header[W_DRAINING] = 1
        for listener in self.listeners.values():
            listener.stop_accepting()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight connections finish within `timeout`, then close the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.close("LR")
        self.header[W_READY] = 0
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)


def _same_sockets(old: ListenerConfig, new: ListenerConfig) -> bool:
    return old.addresses == new.addresses and old.transparent == new.transparent
