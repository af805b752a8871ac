"""RFC 6902 JSON Patch from one document to another (what an admission webhook answers)."""

from __future__ import annotations

from typing import Any


def pointer(path: tuple[str | int, ...]) -> str:
    """RFC 6901: `~` and `/` in keys (annotations have slashes) are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def diff(before: Any, after: Any, path: tuple[str | int, ...] = ()) -> list[dict]:
    """Operations turning `before` into `after`: objects key by key; a list of the same length
    item by item, a list whose length changed replaced whole (its order is meaning)."""
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[dict] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": pointer(path + (key,))})
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": pointer(path + (key,)), "value": value})
            else:
                ops += diff(before[key], value, path + (key,))
        return ops
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            op
            for i, (a, b) in enumerate(zip(before, after, strict=True))
            for op in diff(a, b, path + (i,))
        ]
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": pointer(path), "value": after}]
