"""The filter contract: hooks, statuses, callbacks, header maps and config errors.

An HTTP filter is a class with any of six plain-function hooks, called in
chain order on the request (`decode_*`, toward the upstream) and in reverse
order on the response (`encode_*`, toward the downstream), each with
`end_stream`. A hook returns one of three statuses; to answer locally it calls
`callbacks.send_local_reply(...)` and returns STOP. Work that must wait (a
delay) returns STOP and later calls `callbacks.continue_decoding()` from a
timer: no coroutine per request or per chunk.

A filter factory is built once per worker from validated config and creates
one filter instance per request (or per connection, for TCP filters), unless
the filter class is `shared` (no per-request state: one instance serves every
request). The chain keeps, per hook, only the filters whose class defines
that hook, so a hook no filter implements costs nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pyproxy.counters import FILTER_COUNTERS_BASE, FILTER_COUNTERS_PER_SLOT

# Hook statuses (ints: compared on the hot path).
CONTINUE = 0  # go on to the next filter
STOP = 1  # pause this direction; the filter resumes it later (continue_decoding/continue_encoding)
STOP_AND_BUFFER = 2  # pause and buffer the body (bounded by the watermark) until the filter resumes

# send_local_reply's status that answers nothing: the request's stream is reset instead
# (Envoy's resetStream from a filter), downstream and upstream alike.
RESET_STREAM = 0

DECODE_HOOKS = ("decode_headers", "decode_data", "decode_trailers")
ENCODE_HOOKS = ("encode_headers", "encode_data", "encode_trailers")
TCP_HOOKS = ("on_new_connection", "on_data", "on_stream", "on_close")


class FilterConfigError(ValueError):
    """Bad filter config: `field` is the dotted path inside the filter's config."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


class HttpFilter:
    """Base class for HTTP filters. Define only the hooks you need; the others are never called.

    Per-request instance attributes set by the chain: `callbacks` (the request's chain:
    continue_decoding/continue_encoding, send_local_reply, loop, exchange, the buffers and
    header maps, defer_cleanup).
    """

    callbacks: Any
    # True: the filter keeps no per-request state, so the factory's create() is called once
    # per worker and that instance serves every request. `callbacks` is then set just before
    # each hook call and is only valid during it; per-request work that outlives the hook
    # captures it, and end-of-request work goes through `callbacks.defer_cleanup(self, fn)`
    # (a shared filter cannot define on_destroy).
    shared: ClassVar[bool] = False
    # True: on_destroy does enough work (e.g. calls into a WASM guest) that it should run after
    # the response has left, from the loop; False: it runs as the request ends.
    defer_destroy: ClassVar[bool] = False

    def on_destroy(self) -> None:
        """The request ended (completed, reset or answered locally); release resources."""


class TcpFilter:
    """Base class for TCP-mode filters (connection open, data each way, close).

    `on_new_connection(conn)` returns CONTINUE, STOP (resume later with
    `conn.continue_connecting()`), or calls `conn.close(reset=...)`.
    `on_data(data, from_downstream, end_stream)` sees each chunk (defining it costs a hook per read);
    `data` is a view of a buffer the worker's connections share, valid during the call only:
    copy (`bytes(data)`) whatever the filter keeps.
    `on_stream(data, from_downstream, end_stream)` instead edits or holds the stream: it returns
    what goes on (None: `data` as it came; b"": nothing now). A filter defining it has
    `stream` (the relay) set before its first call: `stream.release(self, data, from_downstream)`
    hands on bytes it held, `stream.close(flag)` ends the connection; `holding(from_downstream)`
    tells the relay to keep the FIN back while it holds bytes. `on_close(flag)` hears the end,
    whether the relay had started or not.
    """

    callbacks: Any


class FilterFactory:
    """Built once per worker from the filter's validated config; `create()` runs per request.

    Subclasses set `name` (the entry-point name) and `filter_class`, and implement
    `validate(config) -> normalized config` (raise FilterConfigError). `modes` lists the
    listener modes the filter supports ("http", "grpc", "tcp").
    """

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ("http", "grpc")
    # Up to FILTER_COUNTERS_PER_SLOT counters, summed over workers and shown in /stats and Prometheus;
    # the factory adds to `self.counters[i]` (a memoryview slice of the shared store).
    counter_names: ClassVar[tuple[str, ...]] = ()
    filter_class: type = HttpFilter  # a factory may choose per instance (tap without bodies)
    tcp_filter_class: ClassVar[type | None] = None

    def __init__(self, config: dict, context: FactoryContext) -> None:
        self.config = config
        self.context = context
        self.counters = context.counters_for(self)

    @classmethod
    def validate(cls, config: dict) -> dict:
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        return {}

    @classmethod
    def check_mode(cls, config: dict, mode: str) -> None:
        """Refuse (FilterConfigError) a validated config that makes no sense in this listener mode."""

    def create(self) -> HttpFilter:
        return self.filter_class()

    def create_tcp(self) -> TcpFilter:
        assert self.tcp_filter_class is not None
        return self.tcp_filter_class()

    def supports_tcp(self) -> bool:
        return "tcp" in self.modes

    def close(self) -> None:
        """The worker dropped this factory (reload or exit)."""


class FactoryContext:
    """What a factory may use at build time: the worker's loop, the listener, the mode, the tap hub,
    and the configured clusters (by name) that filter programs may call."""

    def __init__(
        self,
        loop,
        listener_name: str,
        mode: str,
        block: memoryview | None = None,
        slots: dict | None = None,
        tap_hub=None,
        clusters: dict | None = None,
    ) -> None:
        self.loop = loop
        self.clusters = clusters or {}
        self.listener_name = listener_name
        self.mode = mode
        self.tap_hub = tap_hub
        self._block = block
        self._slots = slots or {}
        self.filter_name = ""  # set by the chain builder before each factory is made

    def counters_for(self, factory: FilterFactory):
        """The factory's counter slots in the listener block (a throwaway list when there is none)."""
        slot = self._slots.get(self.filter_name)
        if self._block is None or slot is None:
            return [0] * FILTER_COUNTERS_PER_SLOT
        base = FILTER_COUNTERS_BASE + slot * FILTER_COUNTERS_PER_SLOT
        return self._block[base : base + FILTER_COUNTERS_PER_SLOT]


class HeaderMap:
    """A mutable view of a message's header list (lower-case byte names) plus HTTP/2-style pseudo-headers.

    Filters (and Lua/WASM through them) read and edit headers here; the chain
    rebuilds the head once at the end if anything changed.
    """

    __slots__ = ("headers", "pseudo", "changed")

    def __init__(self, headers: list[tuple[bytes, bytes]], pseudo: dict[bytes, bytes]) -> None:
        self.headers = headers
        self.pseudo = pseudo
        self.changed = False

    def get(self, name: bytes) -> bytes | None:
        name = name.lower()
        if name[:1] == b":":
            return self.pseudo.get(name)
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        if name[:1] == b":":
            value = self.pseudo.get(name)
            return [value] if value is not None else []
        return [value for key, value in self.headers if key == name]

    def add(self, name: bytes, value: bytes) -> None:
        _check(name, value)
        name = name.lower()
        if name[:1] == b":":
            self.pseudo[name] = value
        else:
            self.headers.append((name, value))
        self.changed = True

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of `name` with one (adds it if absent)."""
        _check(name, value)
        name = name.lower()
        if name[:1] == b":":
            self.pseudo[name] = value
        else:
            self.headers[:] = [(k, v) for k, v in self.headers if k != name]
            self.headers.append((name, value))
        self.changed = True

    def remove(self, name: bytes) -> None:
        name = name.lower()
        if name[:1] == b":":
            return  # pseudo-headers are part of the message itself
        before = len(self.headers)
        self.headers[:] = [(k, v) for k, v in self.headers if k != name]
        self.changed = self.changed or len(self.headers) != before

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.pseudo.items()) + list(self.headers)


def downstream_socket(callbacks):
    """The request's downstream connection's socket (HTTP/1 session or HTTP/2 stream), or None."""
    down = callbacks.exchange.downstream
    stream = getattr(down, "stream", None) or getattr(
        getattr(down, "session", None), "stream", None
    )
    return getattr(stream, "sock", None)


def downstream_address(callbacks, remote: bool) -> tuple[str, int] | str | None:
    """The request's downstream connection: its remote (peer) or local address, as (host, port),
    a Unix socket's path, or None when it is not known (or the connection has gone)."""
    return socket_address(downstream_socket(callbacks), remote)


def socket_address(sock, remote: bool) -> tuple[str, int] | str | None:
    """A socket's remote (peer) or local address, as (host, port) or a Unix socket's path; None
    when there is no socket or it has gone."""
    if sock is None:
        return None
    try:
        name = sock.getpeername() if remote else sock.getsockname()
    except OSError:
        return None
    return name if isinstance(name, str) else (name[0], name[1])


def _check(name: bytes, value: bytes) -> None:
    # A filter (or script) must not be able to smuggle a header line break onto the wire.
    # Byte values (CR 13, LF 10), not one-byte strings: `13 in name` is a memchr, while
    # `b"\r" in name` goes through the buffer protocol first (≈10× slower, per added header).
    # A colon only at the start (a pseudo-header): `58 in name` first, since bytes.find with
    # a start argument costs three memchr-sized checks.
    if (
        13 in name
        or 10 in name
        or 13 in value
        or 10 in value
        or not name
        or (58 in name and name.find(b":", 1) >= 0)
    ):
        raise ValueError(f"invalid header {name!r}: {value!r}")


def loggable(value):
    """Dynamic metadata as the JSON access log carries it: byte strings decoded, keys as text."""
    if isinstance(value, dict):
        return {str(loggable(k)): loggable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
