"""Deadlines: request timeouts on one coarse tick — never early, at most one tick late, cancellable."""

from __future__ import annotations

import asyncio

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
