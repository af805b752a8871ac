"""Proxy-Wasm test modules built from source by a real SDK (see pyproxy.filters.sdk_modules)."""

from __future__ import annotations

from pathlib import Path

from conftest import require_capability
from pyproxy.filters import sdk_modules


def assemblyscript_module(name: str) -> Path:
    require_capability("node and npm (the AssemblyScript SDK)", sdk_modules.have_npm())
    return sdk_modules.assemblyscript_module(name)
