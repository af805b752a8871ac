"""Which relay backend a listener runs, chosen once from its config: copy, splice or zerocopy writes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

from pyproxy.config import ListenerConfig
from pyproxy.io.relay import Relay


def relay_factory(config: ListenerConfig) -> Callable[..., Relay]:
    """The class (or partial) that start_relay instantiates; native modules load only when chosen."""
    if config.relay == "splice":
        from pyproxy.io.splice_relay import SpliceRelay  # lazy: the native module, when chosen

        return SpliceRelay
    if config.write == "zerocopy":
        from pyproxy.io.zerocopy_writer import ZeroCopyRelay  # lazy: the native module, when chosen

        return partial(ZeroCopyRelay, threshold=config.zerocopy_threshold)
    if native_step():
        from pyproxy.io.relay_step import NativeCopyRelay, PolledCopyRelay  # lazy: when there

        return PolledCopyRelay if dispatch(config) == "libuv" else NativeCopyRelay
    return Relay


def dispatch(config: ListenerConfig) -> str:
    """Who runs the native copy step: `relay_dispatch`, with auto resolved. Auto is libuv on
    uvloop (the same-run measurements put it below the loop's dispatch in CPU per message:
    bench/README.md) and the loop elsewhere, silently; an explicit libuv on plain asyncio
    says so where the relay finds no libuv (io/relay_step.py)."""
    if config.relay_dispatch != "auto":
        return config.relay_dispatch
    if config.relay != "copy" or config.write != "send":
        return "loop"
    from pyproxy.eventloop import event_loop_name  # lazy: reads the environment, imports uvloop

    return "libuv" if event_loop_name() == "uvloop" else "loop"


def release_native_polls() -> None:
    """Before an event loop closes: relays whose step libuv runs (relay_dispatch: libuv) go back
    to the loop, since an open libuv poll would keep the loop's closing run from returning."""
    relay_step = sys.modules.get("pyproxy.io.relay_step")  # never imported: no poll to release
    if relay_step is not None:
        relay_step.release_polls()


def native_step() -> bool:
    """Whether relay steps run in C (the native module loaded); else the Python relay carries them."""
    from pyproxy import native  # type: ignore[attr-defined]  # lazy: loads the cffi module once

    return bool(native.AVAILABLE)


def describe(config: ListenerConfig) -> dict:
    """What /server_info and the startup log report for one listener."""
    out: dict[str, object] = {
        "ipc": config.ipc,
        "relay": "splice" if config.relay == "splice" else "userspace-copy",
        "write": config.write,
        "relay_step": "python"
        if config.write == "zerocopy" and config.relay != "splice"
        else "native"
        if config.relay == "splice" or native_step()
        else "python",
    }
    if out["relay_step"] == "native" and config.relay != "splice":
        out["relay_dispatch"] = dispatch(config)
    if config.write == "zerocopy":
        out["zerocopy_threshold"] = config.zerocopy_threshold
    if config.app_socket is not None:
        out["app_socket"] = str(config.app_socket)
    return out
