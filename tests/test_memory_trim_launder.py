"""What pins pymalloc arenas after a burst of connections is dealt with: uvloop's reserves of
freed handles are exchanged for current ones, and sets and dicts grown to the burst's size are
rebuilt at their content's size (pyproxy/memory_trim.py)."""

from __future__ import annotations

import gc
import sys

import pytest

from pyproxy.memory_trim import UVLOOP_FREELIST, Laundry, shrink, shrink_grown

uvloop = pytest.importorskip("uvloop")


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


@pytest.mark.parametrize("kind", [0, 1], ids=["Handle", "TimerHandle"])
def test_after_laundering_uvloop_reuses_the_fresh_handles_not_the_burst_ones(loop, kind):
    _burst(loop)
    laundry = Laundry(loop)
    drawn = laundry.drawn[kind]
    assert len(drawn) > UVLOOP_FREELIST
    # The first ones drawn emptied the reserve (burst-era objects); the rest were allocated now.
    old = {id(obj) for obj in drawn[:UVLOOP_FREELIST]}
    fresh = {id(obj) for obj in drawn[UVLOOP_FREELIST:]}
    _spin(loop)  # the loop lets go of them: only the laundry holds them now
    laundry.release()
    assert not laundry.drawn
    # The next handles come from the reserve again: the fresh ones, none of the old.
    if kind == 0:
        reused = [loop.call_soon(_noop) for _ in range(UVLOOP_FREELIST)]
    else:
        reused = [loop.call_later(3600.0, _noop) for _ in range(UVLOOP_FREELIST)]
        for timer in reused:
            timer.cancel()
    ids = {id(obj) for obj in reused}
    assert not ids & old, "burst-era handles stayed in uvloop's reserve"
    # (all but the few the loop's own callbacks freed into the reserve meanwhile)
    assert len(ids & fresh) >= UVLOOP_FREELIST - 20
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
