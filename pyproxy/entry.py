"""The ``pyproxy`` command: ``run`` loads its event loop without TLS first (pyproxy.no_tls)."""

from __future__ import annotations

import sys

from pyproxy.no_tls import load_event_loop_without_tls


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        load_event_loop_without_tls()
    from pyproxy.cli import main as cli_main  # lazy: after the event loop is loaded

    return cli_main()
