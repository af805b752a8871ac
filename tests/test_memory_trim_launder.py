"""What pins pymalloc arenas after a burst of connections is dealt with: uvloop's reserves of
freed handles are swapped for a stock drawn at start-up, and sets and dicts grown to the burst's
size are rebuilt at their content's size (pyproxy/memory_trim.py); a real worker's memory comes
back after thousands of connections close."""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
from pyproxy.bench.memory import measure

from pyproxy.memory_trim import UVLOOP_FREELIST, HandleReserves, shrink, shrink_grown

uvloop = pytest.importorskip("uvloop")

CONNECTIONS = 5000
# The target is within 2-3 MiB of the idle worker after 10,000; half as many here, the low end
# (5,000: 2.5 MiB before empty pools gave their pages back, 0.8 since).
AFTER_CLOSE_BOUND_KIB = 2 * 1024


def _noop() -> None:
    pass


def _spin(loop) -> None:
    """Two loop iterations: call_soon handles run, closed timers' libuv handles are freed."""
    for _ in range(2):
        loop.run_until_complete(_tick(loop))


async def _tick(loop) -> None:
    fut = loop.create_future()
    loop.call_soon(fut.set_result, None)
    await fut


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def _burst(loop) -> None:
    """Thousands of handles alive at once, then freed: uvloop keeps 250 of each kind."""
    handles = [loop.call_soon(_noop) for _ in range(2000)]
    timers = [loop.call_later(3600.0, _noop) for _ in range(2000)]
    for timer in timers:
        timer.cancel()
    _spin(loop)
    del handles, timers
    _spin(loop)


def _handle_blocks(loop) -> int:
    """Memory blocks of Handle and TimerHandle size alive (uvloop's reserves keep theirs)."""
    probe = loop.call_later(3600.0, _noop)
    sizes = {sys.getsizeof(probe), sys.getsizeof(loop.call_soon(_noop))}
    probe.cancel()
    gc.collect()  # as the trimmer does: CPython's own free lists go too
    return sum(1 for trace in tracemalloc.take_snapshot().traces if trace.size in sizes)


@pytest.fixture
def traced():
    tracemalloc.start(1)
    yield
    tracemalloc.stop()


def test_after_a_burst_uvloop_reserves_are_swapped_and_the_burst_handles_freed(loop, traced):
    reserves = HandleReserves(loop)  # at start-up
    _spin(loop)
    _burst(loop)  # the reserves now hold 250 of the burst's handles of each kind
    before = _handle_blocks(loop)
    reserves.step()  # a check: draws what the reserves hold
    assert reserves.holding
    _spin(loop)  # the loop lets go of them: only the reserves object holds them now
    reserves.step(draw=False)  # the next (last) check: swap
    assert not reserves.holding
    _spin(loop)
    freed = before - _handle_blocks(loop)
    assert freed >= 2 * UVLOOP_FREELIST - 20, "burst-era handles stayed in uvloop's reserves"


def test_a_swap_draws_the_start_up_stock_back_whole(loop):
    reserves = HandleReserves(loop)
    stock = [{id(handle) for handle in kind} for kind in reserves.stock]
    _spin(loop)
    _burst(loop)
    reserves.step()
    _spin(loop)
    reserves.step()  # swaps, and draws what was freed into the reserves meanwhile
    # The same objects, none allocated anew (a new one could land in a burst-era pool).
    assert [{id(handle) for handle in kind} for kind in reserves.stock] == stock
    _spin(loop)
    reserves.step(draw=False)
    assert not reserves.holding
    _spin(loop)


def _holders(reserves: HandleReserves) -> list[int]:
    pairs = (reserves.stock, reserves.drawn, reserves.fresh)
    return sorted(id(held) for pair in pairs for held in (pair, *pair))


def test_the_lists_holding_the_handles_are_the_start_up_ones_throughout(loop):
    # A list allocated during the follow-up checks could land in a burst-era pool and pin it.
    reserves = HandleReserves(loop)
    holders = _holders(reserves)
    _spin(loop)
    _burst(loop)
    for draw in (True, True, False):  # draw, swap and draw again, last swap
        reserves.step(draw)
        _spin(loop)
        assert _holders(reserves) == holders
    assert not reserves.holding


def test_a_swap_keeps_what_was_freed_into_the_reserve_meanwhile_for_the_next_one(loop):
    reserves = HandleReserves(loop)
    _spin(loop)
    _burst(loop)
    reserves.step()
    _spin(loop)
    late = [loop.call_soon(_noop) for _ in range(10)]  # freed after the draw: into the reserve
    _spin(loop)
    late_ids = {id(handle) for handle in late}
    del late
    reserves.step()
    assert reserves.holding, "a swap that may draw draws the reserve's content again"
    assert late_ids <= {id(handle) for handle in reserves.drawn[0]}
    _spin(loop)
    reserves.step(draw=False)
    assert not reserves.holding
    _spin(loop)


def test_a_set_grown_then_emptied_is_rebuilt_small_in_place():
    grown = set(range(100_000))
    for n in range(10, 100_000):
        grown.discard(n)
    before = sys.getsizeof(grown)
    same = grown
    assert shrink(grown)
    assert same is grown and grown == set(range(10))
    assert sys.getsizeof(grown) < before // 100
    assert not shrink(grown), "a right-sized table is left alone"


def test_a_dict_grown_then_emptied_is_rebuilt_small_keeping_its_items_and_order():
    grown = {n: str(n) for n in range(100_000)}
    for n in range(100_000):
        if n not in (5, 99_999, 3):
            del grown[n]
    before = sys.getsizeof(grown)
    assert shrink(grown)
    assert list(grown.items()) == [(3, "3"), (5, "5"), (99_999, "99999")]
    assert sys.getsizeof(grown) < before // 100


def test_small_tables_and_subclasses_are_not_touched():
    small = set(range(100))
    small.clear()
    assert not shrink(small)

    class Watched(dict):
        pass

    grown = Watched((n, n) for n in range(100_000))
    grown.clear()
    assert not shrink(grown)


def test_the_loops_timer_set_is_shrunk_after_many_timers_went(loop):
    timers = [loop.call_later(3600.0, _noop) for _ in range(20_000)]

    def timer_set():
        return next(r for r in gc.get_referents(loop) if type(r) is set and timers[0] in r)

    grown = timer_set()
    for timer in timers[1:]:
        timer.cancel()
    big = sys.getsizeof(grown)
    assert shrink_grown(loop, ()) >= 1
    assert timer_set() is grown and len(grown) == 1
    assert sys.getsizeof(grown) < big // 100
    timers[0].cancel()
    _spin(loop)


def test_a_real_workers_memory_comes_back_after_thousands_of_connections_close():
    # 5,000 TCP connections through a real worker, closed; RSS 12 s later (the trims' span).
    # Measured 8 s after the close: 9.2 MiB above the idle worker before the swaps and the
    # shrinking, 5.3 with them; 12 s after: 2.4-3.5 MiB (9,900 connections) before empty
    # pools gave their pages back, 0.9-1.6 since.
    # One RSS sample can catch other work's pages (seen once in many runs: 2.35 MiB); a fresh
    # worker measured again must then be under the bound, which a real regression is not.
    for _ in range(2):
        result = measure("tcp", CONNECTIONS, 1, [], settle=12.0)
        round_ = result["rounds"][0]
        assert round_["active_seen"] == CONNECTIONS and round_["active_after_close"] == 0, result
        if result["after_close_above_baseline_kib"] < AFTER_CLOSE_BOUND_KIB:
            break
    assert result["after_close_above_baseline_kib"] < AFTER_CLOSE_BOUND_KIB, result
