"""Which allocator a proxy process runs on: the C library's malloc, so memory a burst of
connections took can go back to the OS once they close.

pymalloc (CPython's default for small objects) returns a 1 MiB arena only when
every object in it is gone; after 10,000 connections close, a few survivors
(the event loop's handle freelists among them) keep most arenas alive and tens
of MB stay resident. Under glibc's malloc the same objects sit in heap pages
that ``malloc_trim`` (memory_trim.py) hands back. The interpreter picks its
allocator at start-up only, so ``pyproxy run`` restarts itself once, in the
same process (exec), with ``PYTHONMALLOC=malloc``; a ``PYTHONMALLOC`` already in
the environment is the operator's choice and is kept (``pymalloc`` opts out).
bench/http_bench.py --allocators measures what it costs per request.
"""

from __future__ import annotations

import os
import sys

ENV = "PYTHONMALLOC"
WANTED = "malloc"


def current() -> str:
    """The allocator this process runs on, as PYTHONMALLOC names it."""
    return os.environ.get(ENV) or "pymalloc"


def restart_on_malloc() -> None:
    """exec this very command line again with PYTHONMALLOC=malloc, unless PYTHONMALLOC is set.

    Call only from the command line's own entry (sys.orig_argv must be this command):
    nothing is lost, as nothing has run yet; the pid stays, so a supervisor sees no change.
    """
    if ENV in os.environ or not sys.executable or not sys.orig_argv:
        return
    os.environ[ENV] = WANTED
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        del os.environ[ENV]  # cannot exec (e.g. a frozen binary): run on as we are
