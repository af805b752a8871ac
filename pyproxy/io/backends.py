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

        return PolledCopyRelay if config.relay_dispatch == "libuv" else NativeCopyRelay
    return Relay


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
    if config.relay_dispatch != "loop":
        out["relay_dispatch"] = config.relay_dispatch
    if config.write == "zerocopy":
        out["zerocopy_threshold"] = config.zerocopy_threshold
    if config.app_socket is not None:
        out["app_socket"] = str(config.app_socket)
    return out
