"""Give memory back to the OS after many connections closed: malloc keeps freed heap pages otherwise.

Python objects of a closed connection go back to the allocator, which keeps
the pages for reuse; after a burst of thousands of connections that is tens
of MB the worker never uses again. A cheap periodic check compares the
worker's connection high-water mark with its current count and, after a large
drop, collects the closed connections' reference cycles (a relay and its
directions point at each other) and runs malloc_trim(0) (glibc), which
returns every free heap page, inside the heap too. Under CPython's default
allocator (pymalloc) small objects live in 1 MiB arenas that go back only when
empty, so whatever outlives the burst pins the arenas it sits in. Two kinds
of survivors are dealt with here, after the drop only (nothing on the hot path):

* uvloop's reserves: it keeps up to 250 freed ``Handle`` and ``TimerHandle``
  objects each for reuse (Cython freelists), freed all over the burst's
  arenas. ``HandleReserves`` swaps them for a stock drawn at start-up, so the
  burst-era ones really go (a handle allocated after the burst would land in
  a burst-era pool and pin it in turn).
* containers grown to the burst's size: a set or dict keeps its largest table
  when emptied (the worker's connection set; the loop's timer set and per-fd
  dicts). ``shrink`` rebuilds such a table at its content's size, in place.

What survivors pin is mostly empty: whole pools with nothing in them, in arenas
one live block keeps. With the native ``_pools`` module the trim also drops the
resident pages of every empty pool but its header page (native/pool_pages.c);
``PYPROXY_RELEASE_POOLS=0`` in the environment turns that off.

With ``PYTHONMALLOC=malloc`` in the proxy's environment objects sit in the C
heap and the trim returns what is free wherever it lies, for some CPU on the
Python-heavy paths (bench/http_bench.py --allocators, bench/memory.py
--allocator measure both). Each trim is counted (``memory_trims`` per worker
in /server_info).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from contextvars import Context
from typing import Any

from pyproxy.counters import W_TRIMS
from pyproxy.native import heap_trim, native_extension

log = logging.getLogger("pyproxy.memory_trim")

CHECK_INTERVAL = 2.0  # seconds between checks of the connection count
TRIM_AFTER_DROP = 500  # connections closed since the high-water mark before a trim is worth it
# What closed connections leave behind goes on closing after them (upstream connections they
# kept go back to the pool, which closes them after its idle timeout, 4 s by default): trim
# again on this many following checks.
FOLLOW_UP_CHECKS = 5
UVLOOP_FREELIST = 250  # uvloop's @cython.freelist size for Handle and TimerHandle
# A set or dict whose table takes this many times what a right-sized copy would is rebuilt
# (and only above SHRINK_MIN_BYTES: small tables are not worth a pass).
SHRINK_RATIO = 4
SHRINK_MIN_BYTES = 64 * 1024

_malloc_trim: Any = None  # looked up on first use: ctypes costs memory an idle worker need not pay


def trim() -> bool:
    """malloc_trim(0); False where the C library has none (e.g. musl). Through the native
    module when it is loaded, which spares an idle worker ctypes (about 190 KiB of RSS)."""
    global _malloc_trim
    trimmed = heap_trim()
    if trimmed is not None:
        return trimmed
    if _malloc_trim is None:
        # lazy: ctypes only without the native module, and only once a trim is due.
        import ctypes

        _malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", False)
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


ENV_RELEASE_POOLS = "PYPROXY_RELEASE_POOLS"


def pool_pages() -> Any:
    """The native ``_pools`` module, watching the allocator's arenas from now on; None when it
    is not built, the interpreter's allocator is not the layout it knows, or it is switched off."""
    if os.environ.get(ENV_RELEASE_POOLS, "1") == "0":
        return None
    pools = native_extension("_pools")
    return pools if pools is not None and pools.watch() else None


def _noop() -> None:
    pass


def _draw(loop, count: int, context: Context, into: list[list]) -> None:
    """``count`` Handles and TimerHandles (cancelled), taken from uvloop's reserves first, added
    to the lists of ``into`` (no new list: one allocated now could land in a burst-era pool).
    One ``context`` for all: without it each handle would allocate a copy of the current one."""
    handles, timers = into
    for _ in range(count):
        handles.append(loop.call_soon(_noop, context=context))
        timers.append(loop.call_later(3600.0, _noop, context=context))
    for drawn in into:
        for handle in drawn:
            handle.cancel()


class HandleReserves:
    """Swaps what uvloop keeps in reserve after a burst for handles from the idle worker's arenas.

    A stock of as many Handles and TimerHandles as the reserves hold is drawn at start-up,
    from the arenas the idle worker lives in. After a drop, one check draws what the
    reserves hold (burst-era handles) and keeps them. At the next (the loop has run or
    closed them by then: only this object holds them) ``step`` swaps: it draws what was
    freed into the reserves meanwhile (kept for the next swap), frees the stock, which
    fills the emptied reserves, then the drawn handles, which the full reserves pass to
    the allocator, and draws the stock back out whole (the reserves are last in, first
    out): no handle is allocated anew, so none lands in a burst-era pool. The lists that
    hold them are the start-up ones throughout, refilled in place.
    """

    __slots__ = ("loop", "context", "stock", "drawn", "fresh")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.context = Context()
        self.stock: list[list] = [[], []]
        self.drawn: list[list] = [[], []]
        self.fresh: list[list] = [[], []]  # what a swap draws meanwhile, for the next
        _draw(loop, UVLOOP_FREELIST, self.context, self.stock)
        # A swap queues twice the stock with call_soon at once: grow the loop's ready queue to
        # that now, so the blocks it keeps for reuse are the idle worker's, not the burst's.
        _draw(loop, UVLOOP_FREELIST, self.context, self.fresh)
        for kind in self.fresh:
            kind.clear()

    @property
    def holding(self) -> bool:
        """Drawn handles wait for a swap."""
        return any(self.drawn)

    def step(self, draw: bool = True) -> None:
        """Swap if handles were drawn at an earlier check, else draw; ``draw=False``: the
        last step, which draws nothing it would have to keep."""
        if not self.holding:
            if draw:
                _draw(self.loop, UVLOOP_FREELIST, self.context, self.drawn)
            return
        if draw:
            _draw(self.loop, UVLOOP_FREELIST, self.context, self.fresh)
        for stock, drawn in zip(self.stock, self.drawn, strict=True):
            stock.clear()  # into the reserve, which fills up
            drawn.clear()  # the reserve is full: back to the allocator
        # (each TimerHandle drawn back allocates one float, its due time: one or two pools)
        _draw(self.loop, UVLOOP_FREELIST, self.context, self.stock)
        self.drawn, self.fresh = self.fresh, self.drawn


def uses_uvloop(loop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def shrink(container: Any) -> bool:
    """Rebuild a set's or dict's table at its content's size, keeping the object (others hold
    it). Nothing runs in between: clear() drops no last reference (the copy holds them)."""
    if type(container) not in (set, dict):  # subclasses may hook insertion
        return False
    size = sys.getsizeof(container)
    if size < SHRINK_MIN_BYTES or size < SHRINK_RATIO * sys.getsizeof(container.copy()):
        return False
    if isinstance(container, set):
        members = list(container)
        container.clear()
        container.update(members)
    else:
        items = list(container.items())
        container.clear()
        container.update(items)
    return True


def shrink_grown(loop, containers: tuple) -> int:
    """Shrink ``containers`` and the loop's own sets and dicts (uvloop's are not reachable
    by name: its timer set and per-fd dicts are C attributes, which the GC can list)."""
    shrunk = 0
    for container in (*containers, *gc.get_referents(loop)):
        shrunk += shrink(container)
    return shrunk


class Trimmer:
    """The worker's periodic check: trims after TRIM_AFTER_DROP connections went away."""

    __slots__ = (
        "loop", "admission", "header", "_handle", "_follow_ups", "_reserves", "_pools",
        "_callback", "_context",
    )  # fmt: skip

    def __init__(self, loop, admission, header) -> None:
        """``header``: the worker's counter header; W_TRIMS counts the trims done here."""
        self.loop, self.admission, self.header = loop, admission, header
        self._follow_ups = 0
        self._reserves = HandleReserves(loop) if uses_uvloop(loop) else None
        self._pools = pool_pages()
        # The logger caches whether a level is on at its first use: at start-up, not mid-drop.
        log.isEnabledFor(logging.DEBUG)
        # One bound method and one context for every check: each would be a new object, which
        # the checks after a drop would place among the burst's (and keep there 2 s).
        self._callback, self._context = self._check, Context()
        self._handle = self._schedule()

    def _schedule(self):
        return self.loop.call_later(CHECK_INTERVAL, self._callback, context=self._context)

    def _check(self) -> None:
        admission = self.admission
        now = len(admission.connections)
        if admission.high_water - now >= TRIM_AFTER_DROP:
            log.debug("trimming after %d -> %d connections", admission.high_water, now)
            self._follow_ups = FOLLOW_UP_CHECKS + 1
        reserves = self._reserves
        if self._follow_ups:
            self._follow_ups -= 1
            # Tables rebuilt now outlive the drop: at the last check only, when the burst's
            # arenas hold the least (one rebuilt earlier would pin a pool of its arena).
            shrinking = self._follow_ups == 0
            # Handles freed since the last check may have gone into uvloop's reserve: draw and
            # swap on every check; the last only swaps what the one before drew.
            if reserves is not None:
                reserves.step(draw=self._follow_ups > 0)
            gc.collect()
            if shrinking:
                shrink_grown(self.loop, (admission.connections,))
            trim()
            if self._pools is not None:
                self._pools.release()
            self.header[W_TRIMS] += 1
        admission.high_water = now
        self._handle = self._schedule()

    def cancel(self) -> None:
        self._handle.cancel()
