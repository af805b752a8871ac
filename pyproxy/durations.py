"""Durations as users write them in config and flags: 250us, 10ms, 1.5s, 2m, 1h."""

from __future__ import annotations

_UNITS = (("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def parse_duration(value: object) -> float:
    """Return seconds; raise ValueError naming what was expected."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 10ms, 1s or 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration like 10ms, 1s or 5m")
    text = value.strip()
    # Longest suffix first so "ms" is not read as "s".
    for suffix, scale in sorted(_UNITS, key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                seconds = float(number) * scale
            except ValueError:
                break
            if seconds < 0:
                raise ValueError("duration must not be negative")
            return seconds
    raise ValueError(f"expected a duration like 10ms, 1s or 5m, got {value!r}")
