"""Replays the fuzz regression corpus (tests/fuzz/corpus/<target>/) through its targets.

Files named ``regress-*`` are minimized inputs that once broke a property (a crash, a
disagreement between the HTTP/1 backends, a stray exception from the config loader);
the rest are seeds that keep each target's ordinary paths exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_capability
from fuzz.targets import TARGETS

from pyproxy.codec import http2_native

CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"
FILES = sorted(CORPUS.glob("*/*"))


def test_every_target_has_a_corpus() -> None:
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(TARGETS)


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_corpus_input_keeps_its_property(path: Path) -> None:
    if path.parent.name.startswith("h2_native"):
        require_capability("the native HTTP/2 codec (libnghttp2-dev)", http2_native.AVAILABLE)
    TARGETS[path.parent.name](path.read_bytes())
