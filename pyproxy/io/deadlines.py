"""Timeouts that are armed for every request and almost always cancelled, without a timer each.

A route timeout is armed when a request goes upstream and cancelled a few hundred
microseconds later when the response ends. Arming and cancelling an event-loop
timer costs about 1 µs per request; here arming is a dict insert. Deadlines are
kept per timeout length in insertion-ordered dicts, so each bucket is ordered by
due time, and one loop timer ticks every ``resolution`` seconds while anything is
armed. A deadline fires at most ``resolution`` after it is due, never before.

A deadline that is due sooner than its timeout from now (a request the native
express lane hands back mid-flight keeps the time it already spent) would
break a bucket's order, so it waits in a small unordered set scanned whole.

A deadline whose length is its own (a gRPC call's grpc-timeout, which the
caller counts down: nearly every call's differs) would make a bucket per call:
those (``arm_at``) go in one heap ordered by due time instead. Disarming
empties the owner's entry (nothing of it is held on) and leaves it in place: it
is dropped when it comes up, or when dropped entries outnumber armed ones, so a
cancel stays a dict pop.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import count
from typing import Protocol


class Expiring(Protocol):
    def deadline_expired(self) -> None: ...


class Deadlines:
    __slots__ = ("loop", "resolution", "_buckets", "_early", "_timer", "_heap", "_due", "_order")

    def __init__(self, loop, resolution: float = 0.01) -> None:
        self.loop = loop
        self.resolution = resolution
        self._buckets: dict[float, dict[Expiring, float]] = {}
        self._early: dict[Expiring, float] = {}  # due sooner than their timeout from arming
        self._timer = None
        # arm_at's entries, [due, order, owner]; a disarmed one's owner is None.
        self._heap: list[list] = []
        self._due: dict[Expiring, list] = {}  # the armed owners' entries
        self._order = count()  # ties in the heap never compare owners

    def arm(self, timeout: float, owner: Expiring, due: float | None = None) -> None:
        """Fire ``owner`` once ``timeout`` has passed, or at ``due`` (loop time) if that is sooner."""
        now_due = self.loop.time() + timeout
        if due is not None and due < now_due:
            self._early[owner] = due
        else:
            bucket = self._buckets.get(timeout)
            if bucket is None:
                bucket = self._buckets[timeout] = {}
            bucket[owner] = now_due
        if self._timer is None:
            self._timer = self.loop.call_later(self.resolution, self._tick)

    def arm_at(self, due: float, owner: Expiring) -> None:
        """Fire ``owner`` at ``due`` (loop time): a deadline of its own length (see above)."""
        entry = [due, next(self._order), owner]
        old = self._due.get(owner)
        if old is not None:
            old[2] = None
        self._due[owner] = entry
        heap = self._heap
        heappush(heap, entry)
        if len(heap) > 64 + 2 * len(self._due):  # mostly dropped entries: keep the armed ones
            heap[:] = [item for item in heap if item[2] is not None]
            heapify(heap)
        if self._timer is None:
            self._timer = self.loop.call_later(self.resolution, self._tick)

    def disarm_at(self, owner: Expiring) -> None:
        entry = self._due.pop(owner, None)
        if entry is not None:
            entry[2] = None

    def disarm(self, timeout: float, owner: Expiring) -> None:
        bucket = self._buckets.get(timeout)
        if bucket is not None:
            bucket.pop(owner, None)
        if self._early:
            self._early.pop(owner, None)

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        expired: list[Expiring] = []
        pending = False
        for bucket in self._buckets.values():
            due_now = []
            for owner, due in bucket.items():
                if due > now:
                    pending = True
                    break
                due_now.append(owner)
            for owner in due_now:
                del bucket[owner]
            expired += due_now
        if self._early:
            due_now = [owner for owner, due in self._early.items() if due <= now]
            for owner in due_now:
                del self._early[owner]
            expired += due_now
            pending = pending or bool(self._early)
        heap = self._heap
        if heap:
            armed = self._due
            while heap and heap[0][0] <= now:
                owner = heappop(heap)[2]
                if owner is not None:  # not disarmed (nor armed again for later)
                    del armed[owner]
                    expired.append(owner)
            if armed:
                pending = True
            else:
                heap.clear()
        if pending:
            self._timer = self.loop.call_later(self.resolution, self._tick)
        for owner in expired:
            owner.deadline_expired()
