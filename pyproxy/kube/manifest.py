"""Multi-document YAML in, injected YAML out: untouched documents keep their exact text."""

from __future__ import annotations

import re
from typing import Any

import yaml

from pyproxy.kube.injector import InjectError, Target, describe, inject_object

# A `---` line (with an optional comment) separates documents; kept in the output as written.
_SEPARATOR = re.compile(r"^(---[ \t]*(?:#.*)?)$", re.MULTILINE)


def inject_text(text: str, target: Target) -> str:
    """Inject every workload in a YAML stream. InjectError names the first document at fault,
    and then nothing is produced: a half-injected stream is never written."""
    parts = _SEPARATOR.split(text)  # chunk, separator, chunk, separator, ..., chunk
    index = 0
    for i in range(0, len(parts), 2):
        chunk = parts[i]
        try:
            obj = yaml.safe_load(chunk)
        except yaml.YAMLError as exc:
            raise InjectError(
                f"document {index + 1}", "<yaml>", f"not YAML: {_problem(exc)}"
            ) from None
        if obj is None:
            continue  # blank, or comments only
        index += 1
        where = f"document {index}" + (f" {describe(obj)}" if isinstance(obj, dict) else "")
        injected = inject_document(obj, target, where)
        if injected is not obj:
            parts[i] = _leading_comments(chunk) + dump(injected)
    return "".join(parts)


def inject_document(obj: Any, target: Target, where: str) -> Any:
    """One parsed document; a `kind: List` has each of its items injected."""
    if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
        items = [
            inject_object(item, target, f"{where} items[{i}]")
            for i, item in enumerate(obj["items"])
        ]
        if all(new is old for new, old in zip(items, obj["items"], strict=True)):
            return obj
        return dict(obj, items=items)
    return inject_object(obj, target, where)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # kubectl reads anchors, but people reading the manifest should not need to


def _leading_comments(chunk: str) -> str:
    """The separator line's end and the comment lines above a document, which dumping would lose."""
    kept = []
    for line in chunk.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        kept.append(line)
    text = "".join(kept)
    return text if not text or text.endswith("\n") else text + "\n"


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def _problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", None) or exc).strip()
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1} of the document, column {mark.column + 1})"
