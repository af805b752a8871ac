"""Deadlines: request timeouts on one coarse tick — never early, at most one tick late, cancellable."""

from __future__ import annotations

import asyncio
import weakref

from pyproxy.io.deadlines import Deadlines


class Owner:
    def __init__(self, loop: asyncio.AbstractEventLoop, fired: list) -> None:
        self.loop, self.fired, self.armed_at = loop, fired, loop.time()

    def deadline_expired(self) -> None:
        self.fired.append((self, self.loop.time() - self.armed_at))


def test_deadlines_fire_in_order_never_early_and_not_when_disarmed() -> None:
    loop = asyncio.new_event_loop()
    try:
        fired: list = []
        deadlines = Deadlines(loop, resolution=0.01)
        short = [Owner(loop, fired) for _ in range(3)]
        long_ = Owner(loop, fired)
        cancelled = Owner(loop, fired)
        for owner in short:
            deadlines.arm(0.05, owner)
        deadlines.arm(0.12, long_)
        deadlines.arm(0.05, cancelled)
        deadlines.disarm(0.05, cancelled)
        loop.run_until_complete(asyncio.sleep(0.25))
        assert [owner for owner, _ in fired] == [*short, long_]
        for owner, after in fired:
            due = 0.12 if owner is long_ else 0.05
            assert due <= after < due + 0.05, (due, after)
        # Nothing armed: the tick has stopped by itself.
        assert deadlines._timer is None
    finally:
        loop.close()


def test_an_owner_may_arm_again_from_its_callback() -> None:
    loop = asyncio.new_event_loop()
    try:
        deadlines = Deadlines(loop, resolution=0.01)
        calls: list[float] = []

        class Again:
            def deadline_expired(self) -> None:
                calls.append(loop.time())
                if len(calls) < 2:
                    deadlines.arm(0.03, self)

        deadlines.arm(0.03, Again())
        loop.run_until_complete(asyncio.sleep(0.2))
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.03
    finally:
        loop.close()


def test_deadlines_of_their_own_length_fire_in_due_order_never_early() -> None:
    # A gRPC call's grpc-timeout: every call's differs, so they wait in one heap (arm_at).
    loop = asyncio.new_event_loop()
    try:
        fired: list = []
        deadlines = Deadlines(loop, resolution=0.01)
        now = loop.time()
        owners = [Owner(loop, fired) for _ in range(4)]
        dues = [0.09, 0.03, 0.06, 0.045]
        for owner, after in zip(owners, dues, strict=True):
            deadlines.arm_at(now + after, owner)
        cancelled, moved = Owner(loop, fired), Owner(loop, fired)
        deadlines.arm_at(now + 0.02, cancelled)
        deadlines.disarm_at(cancelled)
        deadlines.arm_at(now + 0.02, moved)
        deadlines.arm_at(now + 0.12, moved)  # armed again for later: fires once, then
        loop.run_until_complete(asyncio.sleep(0.25))
        order = sorted(range(4), key=dues.__getitem__)
        assert [owner for owner, _ in fired] == [*(owners[i] for i in order), moved]
        for owner, after in fired:
            due = 0.12 if owner is moved else dues[owners.index(owner)]
            assert due <= after < due + 0.05, (due, after)
        assert deadlines._timer is None and not deadlines._heap
    finally:
        loop.close()


def test_disarmed_deadlines_hold_nothing_and_do_not_pile_up() -> None:
    # Disarming is a dict pop: the heap entry stays, emptied, and is dropped in bulk once
    # dropped entries outnumber armed ones; a disarmed owner is not kept alive by it.
    loop = asyncio.new_event_loop()
    try:
        fired: list = []
        deadlines = Deadlines(loop, resolution=0.01)
        keep = Owner(loop, fired)
        deadlines.arm_at(loop.time() + 0.05, keep)
        gone = Owner(loop, fired)
        ref = weakref.ref(gone)
        for _ in range(1000):
            owner = Owner(loop, fired)
            deadlines.arm_at(loop.time() + 60, owner)
            deadlines.disarm_at(owner)
        deadlines.arm_at(loop.time() + 60, gone)
        deadlines.disarm_at(gone)
        del gone, owner
        assert ref() is None
        assert len(deadlines._heap) < 100
        loop.run_until_complete(asyncio.sleep(0.1))
        assert [owner for owner, _ in fired] == [keep]
    finally:
        loop.close()
