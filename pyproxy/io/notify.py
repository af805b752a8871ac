"""Derive the cost of one readiness notification (the `notify` stage) on the running event loop.

epoll_wait and the loop's dispatch happen inside the event loop (C code in
uvloop), where userspace cannot put a clock around them per event. We
calibrate instead: on the worker's own loop, a socketpair is made readable
while the loop is busy, and the time from "data sent" to "our callback
entered" is taken many times. That interval is exactly one trip through the
loop's readiness machinery (epoll_wait returning, the handle dispatched, the
Python callback entered). Its median, times the number of readiness
callbacks the data path counted, is the `notify` stage.
"""

from __future__ import annotations

import asyncio
import socket
from time import perf_counter_ns


async def calibrate_notify_cost(rounds: int = 400) -> int:
    """Median nanoseconds from a socket becoming readable to its reader callback running."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    samples: list[int] = []
    done = loop.create_future()
    sent_at = 0

    def kick() -> None:
        nonlocal sent_at
        a.send(b"x")
        sent_at = perf_counter_ns()

    def on_readable() -> None:
        entered = perf_counter_ns()
        b.recv(16)
        samples.append(entered - sent_at)
        if len(samples) >= rounds:
            if not done.done():
                done.set_result(None)
            return
        kick()

    loop.add_reader(b.fileno(), on_readable)
    try:
        kick()
        await asyncio.wait_for(done, timeout=5)
    finally:
        loop.remove_reader(b.fileno())
        a.close()
        b.close()
    # Skip the warm-up rounds; the median ignores scheduler hiccups.
    kept = sorted(
        samples[rounds // 10 :]
    )  # (not statistics.median: that import costs an idle worker)
    return int(kept[len(kept) // 2])
