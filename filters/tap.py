"""The tap filter: records matching requests and their responses as JSON lines, off the data path.

Config:

    path: /var/log/pyproxy/tap.jsonl   # the sink: created 0600, appended (every worker appends whole lines)
    match:                             # all must match; absent or empty: every request
      method: POST                     # or a list of methods
      path_prefix: /api
      headers:
        - {name: x-debug, exact: "1"}  # or prefix: "...", or present: true
    max_body_bytes: 1024               # per direction; 0 records heads only (and skips the body hooks)
    queue_size: 1024                   # records waiting for the sink; when full, new ones are dropped
    drain: loop                        # loop: batches written by a call_soon callback; thread: a writer thread

A record holds both heads (pseudo-headers first, values as latin-1 text), the
bodies up to `max_body_bytes` (UTF-8 text when the content type is textual and
the bytes decode, else base64, with the total size and `truncated`), status,
response flag, start/end wall-clock times and the duration. The hooks only
copy references into a tuple and append it to a bounded queue: JSON encoding
and the write happen later, in a batch. Counters: `tapped`, `dropped`, and
`drain_ns` (time spent encoding and writing, which the `filter:tap` stage does
not include).

The admin server (in the master process) streams the sink of a listener's tap
filters: `GET /tap?listener=NAME[&filter=NAME][&limit=N][&timeout=SECONDS][&from=start]`
answers with chunked JSON lines as workers append them; it works with any
number of worker processes because the file is the meeting point.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections import deque
from time import perf_counter_ns, thread_time_ns, time

from pyproxy.chain.api import CONTINUE, FilterConfigError, FilterFactory, HttpFilter

TAPPED, DROPPED, DRAIN_NS = range(3)
_TEXT_TYPES = (
    b"text/",
    b"application/json",
    b"application/xml",
    b"application/javascript",
    b"application/x-www-form-urlencoded",
)
_HEADER_TESTS = ("exact", "prefix", "present")


def _text_list(value, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise FilterConfigError(where, "expected a string or a list of strings")
    return items


def _positive(config: dict, key: str, default: int, low: int) -> int:
    value = config.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FilterConfigError(key, f"expected an integer >= {low}")
    return value


def _validate_match(match) -> dict:
    if match is None:
        return {"methods": None, "path_prefix": None, "headers": []}
    if not isinstance(match, dict):
        raise FilterConfigError("match", "expected a mapping")
    match = dict(match)
    methods = match.pop("method", None)
    if methods is not None:
        methods = [m.upper() for m in _text_list(methods, "match.method")]
    prefix = match.pop("path_prefix", None)
    if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/")):
        raise FilterConfigError("match.path_prefix", "expected a path starting with /")
    headers = match.pop("headers", [])
    if not isinstance(headers, list):
        raise FilterConfigError("match.headers", "expected a list of {name, exact|prefix|present}")
    tests = []
    for i, item in enumerate(headers):
        where = f"match.headers[{i}]"
        if not isinstance(item, dict):
            raise FilterConfigError(where, "expected {name, exact|prefix|present}")
        item = dict(item)
        name = item.pop("name", None)
        if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n"):
            raise FilterConfigError(f"{where}.name", "expected a header name")
        kinds = [k for k in _HEADER_TESTS if k in item]
        if len(kinds) != 1:
            raise FilterConfigError(where, "expected exactly one of exact, prefix, present")
        kind = kinds[0]
        value = item.pop(kind)
        if kind == "present":
            if not isinstance(value, bool):
                raise FilterConfigError(f"{where}.present", "expected true or false")
        elif not isinstance(value, str):
            raise FilterConfigError(f"{where}.{kind}", "expected a string")
        if item:
            raise FilterConfigError(f"{where}.{next(iter(item))}", "unknown field")
        tests.append({"name": name.lower(), kind: value})
    if match:
        raise FilterConfigError(f"match.{next(iter(match))}", "unknown field")
    return {"methods": methods, "path_prefix": prefix, "headers": tests}


class TapFactory(FilterFactory):
    name = "tap"
    modes = ("http", "grpc")
    counter_names = ("tapped", "dropped", "drain_ns")

    @classmethod
    def validate(cls, config: dict) -> dict:
        path = config.pop("path", None)
        if not isinstance(path, str) or not path:
            raise FilterConfigError("path", "required: the file records are appended to")
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise FilterConfigError("path", f"directory {parent} does not exist")
        match = _validate_match(config.pop("match", None))
        max_body = _positive(config, "max_body_bytes", 1024, 0)
        queue_size = _positive(config, "queue_size", 1024, 1)
        drain = config.pop("drain", "loop")
        if drain not in ("loop", "thread"):
            raise FilterConfigError("drain", "expected loop or thread")
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        return {
            "path": path,
            "match": match,
            "max_body_bytes": max_body,
            "queue_size": queue_size,
            "drain": drain,
        }

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        match = config["match"]
        self.methods = frozenset(m.encode() for m in match["methods"] or ()) or None
        self.path_prefix = match["path_prefix"].encode() if match["path_prefix"] else None
        self.header_tests = [
            (
                t["name"].encode(),
                "exact" if "exact" in t else "prefix" if "prefix" in t else "present",
                (t.get("exact") or t.get("prefix") or "").encode(),
                bool(t.get("present", True)),
            )
            for t in match["headers"]
        ]
        self.match_all = self.methods is None and self.path_prefix is None and not self.header_tests
        self.max_body = config["max_body_bytes"]
        if self.max_body == 0:
            self.filter_class = TapHeadsFilter  # no body hooks: the chain then never sees bodies
        self.listener = context.listener_name
        self.worker = os.getpid()
        # Every record of this worker starts the same way (see encode_record).
        self.record_prefix = (
            f'{{"listener":{json.encoder.encode_basestring_ascii(self.listener)},'
            f'"worker":{self.worker}'
        )
        sink_class = ThreadSink if config["drain"] == "thread" else LoopSink
        self.sink = sink_class(self, config["path"], config["queue_size"], context.loop)

    def create(self) -> HttpFilter:
        return self.filter_class(self)

    def matches(self, headers) -> bool:
        if self.methods is not None and headers.get(b":method") not in self.methods:
            return False
        if self.path_prefix is not None and not (headers.get(b":path") or b"").startswith(
            self.path_prefix
        ):
            return False
        for name, kind, value, present in self.header_tests:
            values = headers.get_all(name)
            if kind == "present":
                if bool(values) != present:
                    return False
            elif kind == "exact":
                if value not in values:
                    return False
            elif not any(v.startswith(value) for v in values):
                return False
        return True

    def push(self, record: tuple) -> None:
        if self.sink.push(record):
            self.counters[TAPPED] += 1
        else:
            self.counters[DROPPED] += 1

    def close(self) -> None:
        self.sink.close()


class TapFilter(HttpFilter):
    """One request: copies references on the way through; the record is built when the request ends."""

    __slots__ = (
        "factory",
        "callbacks",
        "on",
        "started",
        "started_ns",
        "request",
        "request_body",
        "request_size",
        "response",
        "response_body",
        "response_size",
    )

    def __init__(self, factory: TapFactory) -> None:
        self.factory = factory
        self.on = False

    def decode_headers(self, headers, end_stream: bool) -> int:
        factory = self.factory
        if not factory.match_all and not factory.matches(headers):
            return CONTINUE
        self.on = True
        self.started = time()
        self.started_ns = perf_counter_ns()
        self.request = headers.items()
        self.request_body: list[bytes] = []
        self.request_size = 0
        self.response = None
        self.response_body: list[bytes] = []
        self.response_size = 0
        return CONTINUE

    def decode_data(self, data, end_stream: bool) -> int:
        if self.on:
            room = self.factory.max_body - self.request_size
            if room > 0 and data:
                self.request_body.append(bytes(data[:room]))
            self.request_size += len(data)
        return CONTINUE

    def encode_headers(self, headers, end_stream: bool) -> int:
        if self.on:
            self.response = headers.items()
        return CONTINUE

    def encode_data(self, data, end_stream: bool) -> int:
        if self.on:
            room = self.factory.max_body - self.response_size
            if room > 0 and data:
                self.response_body.append(bytes(data[:room]))
            self.response_size += len(data)
        return CONTINUE

    def on_destroy(self) -> None:
        if not self.on:
            return
        self.on = False
        exchange = self.callbacks.exchange
        self.factory.push(
            (
                self.started,
                perf_counter_ns() - self.started_ns,
                self.request,
                self.request_body,
                self.request_size,
                self.response,
                self.response_body,
                self.response_size,
                getattr(exchange, "status", None),
                getattr(exchange, "flag", ""),
            )
        )


class TapHeadsFilter(HttpFilter):
    """`max_body_bytes: 0`: heads only, so the chain passes bodies by without calling the tap."""

    __slots__ = ("inner", "callbacks")

    def __init__(self, factory: TapFactory) -> None:
        self.inner = TapFilter(factory)

    def decode_headers(self, headers, end_stream: bool) -> int:
        self.inner.callbacks = self.callbacks
        return self.inner.decode_headers(headers, end_stream)

    def encode_headers(self, headers, end_stream: bool) -> int:
        return self.inner.encode_headers(headers, end_stream)

    def on_destroy(self) -> None:
        self.inner.on_destroy()


# ---- off the hot path: records to JSON lines -------------------------------------------------


def _content_type(items) -> bytes:
    if items:
        for name, value in items:
            if name == b"content-type":
                return value.lower()
    return b""


def _body(chunks: list[bytes], size: int, items) -> dict:
    data = b"".join(chunks)
    out: dict = {"bytes": size, "truncated": size > len(data)}
    if not data:
        out["body"] = ""
        out["encoding"] = "utf8"
        return out
    ctype = _content_type(items)
    textual = (
        not ctype
        or ctype.startswith(_TEXT_TYPES)
        or ctype.split(b";")[0].endswith((b"+json", b"+xml"))
    )
    if textual:
        text = _utf8(data, out["truncated"])
        if text is not None:
            out["body"] = text
            out["encoding"] = "utf8"
            return out
    out["body"] = base64.b64encode(data).decode("ascii")
    out["encoding"] = "base64"
    return out


def _utf8(data: bytes, truncated: bool) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # A cut at max_body_bytes may split a character: that alone does not make the body binary.
    for cut in range(1, 4 if truncated else 1):
        try:
            return data[:-cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


# JSON for records, written out by hand with json's own string escaper: the same bytes as
# json.dumps(record, separators=(",", ":")), at a fraction of the cost (no dicts, no walk).
_json_str = json.encoder.encode_basestring_ascii
_PAIR_CACHE_MAX = 4096
_pairs: dict[tuple[bytes, bytes], str] = {}  # header (name, value) -> its JSON; most repeat


def _head_json(items) -> str:
    if not items:
        return "[]"
    pairs = _pairs
    parts = []
    for item in items:
        text = pairs.get(item)
        if text is None:
            name, value = item
            text = f"[{_json_str(name.decode('latin-1'))},{_json_str(value.decode('latin-1'))}]"
            if len(pairs) >= _PAIR_CACHE_MAX:
                pairs.clear()
            pairs[item] = text
        parts.append(text)
    return "[" + ",".join(parts) + "]"


def _body_json(chunks: list[bytes], size: int, items) -> str:
    body = _body(chunks, size, items)
    return (
        f'"bytes":{size},"truncated":{"true" if body["truncated"] else "false"},'
        f'"body":{_json_str(body["body"])},"encoding":"{body["encoding"]}"'
    )


def _number(value) -> str:
    if value is None:
        return "null"
    return float.__repr__(value) if isinstance(value, float) else int.__repr__(value)


def encode_record(factory: TapFactory, record: tuple) -> bytes:
    (
        started,
        duration_ns,
        request,
        req_body,
        req_size,
        response,
        resp_body,
        resp_size,
        status,
        flag,
    ) = record
    return (
        f"{factory.record_prefix}"
        f',"start":{_number(started)},"end":{_number(started + duration_ns / 1e9)}'
        f',"duration_ms":{_number(duration_ns / 1e6)},"status":{_number(status)}'
        f',"flag":{_json_str(flag or "")}'
        f',"request":{{"headers":{_head_json(request)},{_body_json(req_body, req_size, request)}}}'
        f',"response":{{"headers":{_head_json(response)},'
        f"{_body_json(resp_body, resp_size, response)}}}}}\n"
    ).encode()


def _open_sink(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a tap holds request contents: owner only, whatever was there before
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LoopSink:
    """Batches records and writes them from a call_soon callback: one write per loop iteration."""

    def __init__(self, factory: TapFactory, path: str, size: int, loop) -> None:
        self.factory = factory
        self.fd = _open_sink(path)
        self.size = size
        self.loop = loop
        self.queue: list[tuple] = []
        self.scheduled = False

    def push(self, record: tuple) -> bool:
        queue = self.queue
        if len(queue) >= self.size:
            return False
        queue.append(record)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        self.scheduled = False
        if not self.queue or self.fd < 0:
            return
        t0 = perf_counter_ns()
        batch, self.queue = self.queue, []
        factory = self.factory
        try:
            _write_all(self.fd, b"".join([encode_record(factory, r) for r in batch]))
        except OSError:
            factory.counters[DROPPED] += len(batch)
        factory.counters[DRAIN_NS] += perf_counter_ns() - t0

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ThreadSink:
    """Hands records to a writer thread through a bounded deque; the thread encodes and writes."""

    def __init__(self, factory: TapFactory, path: str, size: int, loop) -> None:
        self.factory = factory
        self.fd = _open_sink(path)
        self.size = size
        self.queue: deque = deque()
        self.idle = True
        self.closed = False
        self.wakeup = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tap-writer", daemon=True)
        self.thread.start()

    def push(self, record: tuple) -> bool:
        queue = self.queue
        if len(queue) >= self.size:
            return False
        queue.append(record)
        if self.idle:
            self.idle = False
            self.wakeup.set()
        return True

    def _run(self) -> None:
        queue, factory = self.queue, self.factory
        while True:
            self.wakeup.wait()
            self.wakeup.clear()
            while queue:
                t0 = thread_time_ns()
                batch = [queue.popleft() for _ in range(len(queue))]
                try:
                    _write_all(self.fd, b"".join([encode_record(factory, r) for r in batch]))
                except OSError:
                    factory.counters[DROPPED] += len(batch)
                factory.counters[DRAIN_NS] += thread_time_ns() - t0
            if self.closed:
                return
            self.idle = True
            if queue:  # appended after the last check but before idle was set: go round again
                self.idle = False
                self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()
        self.thread.join(5)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the admin side (master process): stream a listener's tap files ---------------------------

POLL_SECONDS = 0.05


def tap_paths(config, listener: str, filter_name: str | None = None) -> list[str] | None:
    """The sink files of a listener's tap filters (listener-wide and per route); None: no such listener."""
    for lconf in config.listeners:
        if lconf.name != listener:
            continue
        specs = list(lconf.filters) + [s for r in lconf.routes for s in (r.filters or ())]
        paths = []
        for spec in specs:
            if spec.type == "tap" and (filter_name is None or spec.name == filter_name):
                if spec.config["path"] not in paths:
                    paths.append(spec.config["path"])
        return paths
    return None


async def follow(paths: list[str], limit: int | None, timeout: float | None, from_start: bool):
    """Yield whole JSON lines as they are appended to any of `paths`; b"" on each idle poll."""
    offsets = {}
    pending = {path: b"" for path in paths}
    for path in paths:
        try:
            offsets[path] = 0 if from_start else os.stat(path).st_size
        except FileNotFoundError:
            offsets[path] = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    sent = 0
    while True:
        lines = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < offsets[path]:  # truncated or replaced: start over
                        offsets[path], pending[path] = 0, b""
                    f.seek(offsets[path])
                    data = f.read(min(size - offsets[path], 4 * 1024 * 1024))
            except FileNotFoundError:
                continue
            offsets[path] += len(data)
            data = pending[path] + data
            cut = data.rfind(b"\n") + 1
            pending[path] = data[cut:]
            if cut:
                lines.extend(data[:cut].splitlines(keepends=True))
        if limit is not None:
            lines = lines[: limit - sent]
        if lines:
            sent += len(lines)
            yield b"".join(lines)
        else:
            yield b""
        if (limit is not None and sent >= limit) or (deadline and loop.time() >= deadline):
            return
        await asyncio.sleep(POLL_SECONDS)


def admin_endpoint(config, query: dict):
    """`GET /tap?listener=NAME[&filter=NAME][&limit=N][&timeout=S][&from=start]` for the admin server."""
    from pyproxy.admin import Response, StreamResponse

    listener = (query.get("listener") or [""])[0]
    filter_name = (query.get("filter") or [None])[0]
    try:
        limit = int(query["limit"][0]) if "limit" in query else None
        timeout = float(query["timeout"][0]) if "timeout" in query else None
    except ValueError:
        return Response.text("limit and timeout must be numbers\n", 400)
    paths = tap_paths(config, listener, filter_name)
    if paths is None:
        names = ", ".join(lc.name for lc in config.listeners)
        return Response.text(f"no listener {listener!r}; listeners: {names}\n", 404)
    if not paths:
        return Response.text(f"listener {listener!r} has no tap filter\n", 404)
    from_start = (query.get("from") or [""])[0] == "start"
    return StreamResponse(follow(paths, limit, timeout, from_start), "application/x-ndjson")


TapFactory.filter_class = TapFilter
