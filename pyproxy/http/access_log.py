"""The access log: one JSON line per request, written through a buffer flushed off the request path."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

FLUSH_BYTES = 64 * 1024


class AccessLog:
    """Appends JSON lines; flushes when the buffer fills and when the loop is idle (via call_soon)."""

    def __init__(self, handle: TextIO, owned: bool) -> None:
        self._handle = handle
        self._owned = owned
        self._pending: list[str] = []
        self._size = 0
        self._flush_scheduled = False

    @classmethod
    def open(cls, target: str, listener: str) -> AccessLog:
        if target == "stdout":
            return cls(sys.stdout, owned=False)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return cls(os.fdopen(fd, "a", encoding="utf-8"), owned=True)

    def write(self, loop, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        self._pending.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        try:
            self._handle.write("\n".join(self._pending) + "\n")
            self._handle.flush()
        except OSError:
            pass  # a full disk must not take the data path down
        self._pending.clear()
        self._size = 0

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._handle.close()
