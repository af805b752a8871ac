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
"""

from __future__ import annotations

from typing import Protocol


class Expiring(Protocol):
    def deadline_expired(self) -> None: ...


class Deadlines:
    __slots__ = ("loop", "resolution", "_buckets", "_early", "_timer")

    def __init__(self, loop, resolution: float = 0.01) -> None:
        self.loop = loop
        self.resolution = resolution
        self._buckets: dict[float, dict[Expiring, float]] = {}
        self._early: dict[Expiring, float] = {}  # due sooner than their timeout from arming
        self._timer = None

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
        if pending:
            self._timer = self.loop.call_later(self.resolution, self._tick)
        for owner in expired:
            owner.deadline_expired()
