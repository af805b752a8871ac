"""Empty pymalloc pools in arenas a few survivors keep alive give their pages back
(native/pool_pages.c), and the allocator goes on working over them: each case runs in a
fresh interpreter, whose arenas are watched from its start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pyproxy.native import native_extension

pytestmark = pytest.mark.skipif(
    native_extension("_pools") is None, reason="the native _pools module is not built"
)

# A burst of small objects in arenas of their own, one in 2,000 kept: each survivor keeps its
# pool, most pools around it are empty, and every arena stays allocated.
BURST = """
import gc, json, sys
from pyproxy.native import _pools

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

assert _pools.watch()
before_arenas = _pools.arenas()
burst = [(n, str(n)) for n in range(400_000)]
kept = burst[::2000]
del burst
gc.collect()
freed = rss_kib()
released = _pools.release()
after = rss_kib()
# The pools are used again: fresh objects over the dropped pages, and the survivors intact.
again = [(n, str(n)) for n in range(400_000)]
intact = all(s == str(n) for n, s in again) and all(s == str(n) for n, s in kept)
del again
gc.collect()
json.dump({"arenas": _pools.arenas() - before_arenas, "freed": freed, "after": after,
           "released": released, "intact": intact, "second": _pools.release()}, sys.stdout)
"""


def _run(script: str, allocator: str = "pymalloc") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={"PYTHONMALLOC": allocator, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_empty_pools_in_pinned_arenas_give_their_pages_back():
    result = _run(BURST)
    assert result["arenas"] >= 20, result  # the burst's arenas, kept by their survivors
    # 400,000 tuples and strings are about 50 MiB; their empty pools hold most of it.
    dropped_kib = result["freed"] - result["after"]
    assert result["released"] >= 10 * 1024 * 1024, result
    assert dropped_kib >= 0.8 * result["released"] / 1024, "released pages stayed resident"
    assert result["intact"], "objects in pools used again after a release are wrong"
    assert result["second"] > 0, "pools used again are released again once empty"


def test_the_debug_allocator_shares_the_layout():
    # PYTHONMALLOC=pymalloc_debug (and -X dev) adds guard bytes to blocks, not to pools.
    result = _run(BURST, "pymalloc_debug")
    assert result["released"] >= 10 * 1024 * 1024 and result["intact"], result


def test_without_pymalloc_there_are_no_arenas_to_watch():
    result = _run(BURST, "malloc")
    assert result["arenas"] == 0 and result["released"] == 0 and result["intact"], result
