"""Finds filter factories through the `pyproxy.filters` entry-point group, and validates filter specs."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from pyproxy.chain.api import FilterConfigError, FilterFactory

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "pyproxy.filters"


@cache
def available() -> dict[str, EntryPoint]:
    """Entry points by name; built-in filters register here exactly like third-party ones."""
    from importlib.metadata import entry_points  # only configs with filters pay for it

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def factory_class(type_name: str) -> type[FilterFactory]:
    entry = available().get(type_name)
    if entry is None:
        known = ", ".join(sorted(available())) or "none"
        raise FilterConfigError("", f"unknown filter type {type_name!r} (installed: {known})")
    try:
        cls = entry.load()
    except Exception as exc:  # a broken plugin must be reported, not crash config loading
        raise FilterConfigError("", f"filter {type_name!r} failed to load: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, FilterFactory)):
        raise FilterConfigError("", f"entry point {type_name!r} is not a FilterFactory")
    return cls


def validate(type_name: str, config: object, mode: str) -> dict:
    """Normalise one filter's config for a listener of `mode`; raise FilterConfigError naming the field."""
    cls = factory_class(type_name)
    if mode not in cls.modes:
        raise FilterConfigError(
            "",
            f"filter {type_name!r} does not support {mode} mode (supports: {', '.join(cls.modes)})",
        )
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise FilterConfigError("", "expected a mapping")
    normalized = cls.validate(dict(config))
    cls.check_mode(normalized, mode)
    return normalized
