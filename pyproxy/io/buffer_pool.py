"""Relay buffers shared by a worker's connections, so memory follows bytes in flight, not connections.

A relay direction reads into the pool's top free buffer and writes it out at
once; only when the destination does not take everything does the direction
keep that buffer (take) until the rest is written (give). An idle connection
therefore holds no buffer at all, and the worker holds one per direction
that is blocked on a slow destination, plus a few spare ones. The event loop
is single-threaded and every read-then-write runs in one callback, so no two
directions can use the top buffer at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

SPARE = 16  # free buffers kept for the next blocked directions; the rest are released


class Pool(Generic[T]):
    """Free buffers made on demand; at most `spare` kept when given back, the rest discarded."""

    __slots__ = ("_free", "_make", "_discard", "_spare")

    def __init__(
        self,
        make: Callable[[], T],
        discard: Callable[[T], None] | None = None,
        spare: int = SPARE,
    ) -> None:
        self._free: list[T] = []
        self._make, self._discard, self._spare = make, discard, spare

    def top(self) -> T:
        """The buffer the next read goes into; stays in the pool unless taken."""
        free = self._free
        if not free:
            free.append(self._make())
        return free[-1]

    def take(self) -> T:
        """Keep the top buffer (it holds bytes the destination has not taken yet)."""
        return self._free.pop()

    def give(self, item: T) -> None:
        """An emptied buffer comes back."""
        if len(self._free) < self._spare:
            self._free.append(item)
        elif self._discard is not None:
            self._discard(item)

    def __len__(self) -> int:
        return len(self._free)


def copy_buffer(size: int) -> Callable[[], tuple[bytearray, memoryview]]:
    """A maker of `size`-byte buffers (with their memoryview) for a Pool."""

    def make() -> tuple[bytearray, memoryview]:
        buf = bytearray(size)
        return buf, memoryview(buf)

    return make


_COPY_POOLS: dict[int, Pool[tuple[bytearray, memoryview]]] = {}


def copy_pool(size: int) -> Pool[tuple[bytearray, memoryview]]:
    """This process's pool of `size`-byte userspace buffers (one per configured buffer_size)."""
    pool = _COPY_POOLS.get(size)
    if pool is None:
        pool = _COPY_POOLS[size] = Pool(copy_buffer(size))
    return pool
