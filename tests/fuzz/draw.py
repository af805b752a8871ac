"""Structured values drawn from a fuzzer's bytes, without depending on atheris (the corpus replay
runs in the plain test suite): every draw is total, an exhausted input reads as zeros."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Draw:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            return 0
        self.pos = pos + 1
        return self.data[pos]

    def below(self, n: int) -> int:
        """An int in [0, n), from one byte for n <= 256, two otherwise."""
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def flag(self) -> bool:
        return self.byte() & 1 == 1

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def blob(self, max_len: int) -> bytes:
        """A length byte then that many bytes (fewer when the input runs out)."""
        size = self.below(max_len + 1)
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out

    def text(self, alphabet: bytes, max_len: int) -> bytes:
        """Up to ``max_len`` characters of ``alphabet`` (one byte each)."""
        return bytes(alphabet[self.below(len(alphabet))] for _ in range(self.below(max_len + 1)))

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


def splits(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut into pieces at points chosen by ``seed`` (0: whole, 1: byte by byte)."""
    if seed == 0 or not data:
        return [data]
    if seed == 1:
        return [data[i : i + 1] for i in range(len(data))]
    pieces, pos, step = [], 0, seed
    while pos < len(data):
        size = 1 + step % 23
        pieces.append(data[pos : pos + size])
        pos += size
        step = (step * 1103515245 + 12345) & 0x7FFFFFFF
    return pieces
