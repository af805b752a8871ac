"""Which relay backend a listener runs, chosen once from its config: copy, splice or zerocopy writes."""

from __future__ import annotations

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
    return Relay


def describe(config: ListenerConfig) -> dict:
    """What /server_info and the startup log report for one listener."""
    out: dict[str, object] = {
        "ipc": config.ipc,
        "relay": "splice" if config.relay == "splice" else "userspace-copy",
        "write": config.write,
    }
    if config.write == "zerocopy":
        out["zerocopy_threshold"] = config.zerocopy_threshold
    if config.app_socket is not None:
        out["app_socket"] = str(config.app_socket)
    return out
