"""Choose the event loop: uvloop when installed (default), plain asyncio on request or as fallback."""

from __future__ import annotations

import asyncio
import os

ENV = "PYPROXY_EVENT_LOOP"  # auto | uvloop | asyncio


def _uvloop():
    choice = os.environ.get(ENV, "auto")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(f"{ENV}=uvloop but uvloop is not installed") from None
        return None
    return uvloop


def event_loop_name() -> str:
    return "uvloop" if _uvloop() is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
