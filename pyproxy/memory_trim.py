"""Give memory back to the OS after many connections closed: malloc keeps freed heap pages otherwise.

Python objects of a closed connection go back to the allocator, which keeps
the pages for reuse; after a burst of thousands of connections that is tens
of MB the worker never uses again. A cheap periodic check compares the
worker's connection high-water mark with its current count and, after a large
drop, collects the closed connections' reference cycles (a relay and its
directions point at each other) and runs malloc_trim(0) (glibc), which
returns every free heap page, inside the heap too. Under CPython's default
allocator (pymalloc) small objects live in 1 MiB arenas that go back only when
empty, and a few survivors (uvloop keeps up to 250 freed handles of each kind
for reuse) pin most of them: a bounded reserve the next burst reuses. With
``PYTHONMALLOC=malloc`` in the proxy's environment those objects sit in the
C heap and the trim returns most of them, for some CPU on the Python-heavy
paths (bench/http_bench.py --allocators, bench/memory.py --allocator measure
both). Each trim is counted (``memory_trims`` per worker in /server_info).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from pyproxy.counters import W_TRIMS
from pyproxy.native import heap_trim

log = logging.getLogger("pyproxy.memory_trim")

CHECK_INTERVAL = 2.0  # seconds between checks of the connection count
TRIM_AFTER_DROP = 500  # connections closed since the high-water mark before a trim is worth it
# What closed connections leave behind goes on closing after them (upstream connections they
# kept go back to the pool, which closes them after its idle timeout, 4 s by default): trim
# again on this many following checks.
FOLLOW_UP_CHECKS = 5

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


class Trimmer:
    """The worker's periodic check: trims after TRIM_AFTER_DROP connections went away."""

    __slots__ = ("loop", "admission", "header", "_handle", "_follow_ups")

    def __init__(self, loop, admission, header) -> None:
        """``header``: the worker's counter header; W_TRIMS counts the trims done here."""
        self.loop, self.admission, self.header = loop, admission, header
        self._follow_ups = 0
        self._handle = loop.call_later(CHECK_INTERVAL, self._check)

    def _check(self) -> None:
        admission = self.admission
        now = len(admission.connections)
        if admission.high_water - now >= TRIM_AFTER_DROP:
            log.debug("trimming after %d -> %d connections", admission.high_water, now)
            self._follow_ups = FOLLOW_UP_CHECKS + 1
        if self._follow_ups:
            self._follow_ups -= 1
            gc.collect()
            trim()
            self.header[W_TRIMS] += 1
        admission.high_water = now
        self._handle = self.loop.call_later(CHECK_INTERVAL, self._check)

    def cancel(self) -> None:
        self._handle.cancel()
