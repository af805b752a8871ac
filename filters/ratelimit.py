"""The local rate limit filter: token buckets per worker, per downstream connection or per key.

Config (Envoy's local_ratelimit names where Envoy has them):

    token_bucket: {max_tokens: 100, tokens_per_fill: 10, fill_interval: 1s}
    scope: worker            # worker: one bucket set per worker process; connection: per downstream connection
    key: {header: x-user}    # or {downstream_address: true}; absent: one bucket for everything in the scope
    max_keys: 10000          # keyed buckets kept (least recently used evicted), so keys cannot grow memory
    status: 429              # or {code: 429}
    grpc_status: RESOURCE_EXHAUSTED   # or UNAVAILABLE (8 / 14); used for gRPC requests

Buckets refill lazily and in whole fills (Envoy's discrete fills): on each
check, `tokens_per_fill` for every `fill_interval` elapsed since the last fill,
capped at `max_tokens`; there are no timers. A limited request is answered
locally with the status, `x-ratelimited: true` and flag RL. In TCP mode the
filter limits new connections: one token per connection, a limited one is
reset (flag RL); `scope: connection` and `key.header` do not apply there and
are refused at load.
"""

from __future__ import annotations

from collections import OrderedDict
from time import monotonic
from weakref import WeakKeyDictionary

from pyproxy.chain.api import (
    CONTINUE,
    STOP,
    FilterConfigError,
    FilterFactory,
    HttpFilter,
    TcpFilter,
)
from pyproxy.config import ListenerMode
from pyproxy.durations import parse_duration

ALLOWED, LIMITED = range(2)
GRPC_CODES = {"RESOURCE_EXHAUSTED": 8, "UNAVAILABLE": 14, 8: 8, 14: 14}
RATELIMITED_HEADER = (b"x-ratelimited", b"true")
BODY = b"local_rate_limited\n"
_NO_KEY = b""  # requests without the key header share one bucket


def _int(value, where: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FilterConfigError(where, f"expected an integer >= {low}")
    if high is not None and value > high:
        raise FilterConfigError(where, f"expected an integer <= {high}")
    return value


class RateLimitFactory(FilterFactory):
    name = "ratelimit"
    modes = ("http", "grpc", "tcp")
    counter_names = ("allowed", "limited")

    @classmethod
    def validate(cls, config: dict) -> dict:
        bucket = config.pop("token_bucket", None)
        if not isinstance(bucket, dict):
            raise FilterConfigError(
                "token_bucket", "required: {max_tokens, tokens_per_fill, fill_interval}"
            )
        bucket = dict(bucket)
        if "max_tokens" not in bucket:
            raise FilterConfigError("token_bucket.max_tokens", "required")
        max_tokens = _int(bucket.pop("max_tokens"), "token_bucket.max_tokens", 1)
        per_fill = _int(bucket.pop("tokens_per_fill", 1), "token_bucket.tokens_per_fill", 1)
        if "fill_interval" not in bucket:
            raise FilterConfigError("token_bucket.fill_interval", "required, e.g. 1s")
        try:
            interval = parse_duration(bucket.pop("fill_interval"))
        except (ValueError, TypeError) as exc:
            raise FilterConfigError("token_bucket.fill_interval", str(exc)) from None
        if interval < 0.001:
            raise FilterConfigError("token_bucket.fill_interval", "must be at least 1ms")
        if bucket:
            raise FilterConfigError(f"token_bucket.{next(iter(bucket))}", "unknown field")

        scope = config.pop("scope", "worker")
        if scope not in ("worker", "connection"):
            raise FilterConfigError("scope", "expected worker or connection")

        key = config.pop("key", None)
        key_kind, key_header = None, None
        if key is not None:
            if not isinstance(key, dict) or len(key) != 1:
                raise FilterConfigError(
                    "key", "expected {header: NAME} or {downstream_address: true}"
                )
            ((kind, value),) = key.items()
            if kind == "header":
                if (
                    not isinstance(value, str)
                    or not value
                    or value.startswith(":")
                    or any(c in value for c in " \t\r\n:")
                ):
                    raise FilterConfigError("key.header", "expected a header name")
                key_kind, key_header = "header", value.lower()
            elif kind == "downstream_address":
                if value is not True:
                    raise FilterConfigError("key.downstream_address", "expected true")
                key_kind = "downstream_address"
            else:
                raise FilterConfigError(f"key.{kind}", "unknown key (header or downstream_address)")
        max_keys = _int(config.pop("max_keys", 10000), "max_keys", 1)

        status = config.pop("status", 429)
        if isinstance(status, dict):
            status = dict(status)
            code = status.pop("code", None)
            if status:
                raise FilterConfigError(f"status.{next(iter(status))}", "unknown field")
            status = code
        status = _int(status, "status", 400, 599) if status is not None else 429

        grpc = config.pop("grpc_status", "RESOURCE_EXHAUSTED")
        if isinstance(grpc, str):
            grpc = grpc.upper()
        if isinstance(grpc, bool) or grpc not in GRPC_CODES:
            raise FilterConfigError(
                "grpc_status", "expected RESOURCE_EXHAUSTED (8) or UNAVAILABLE (14)"
            )
        if config:
            raise FilterConfigError(next(iter(config)), "unknown field")
        return {
            "token_bucket": {
                "max_tokens": max_tokens,
                "tokens_per_fill": per_fill,
                "fill_interval": interval,
            },
            "scope": scope,
            "key": {key_kind: key_header or True} if key_kind else None,
            "max_keys": max_keys,
            "status": status,
            "grpc_status": GRPC_CODES[grpc],
        }

    @classmethod
    def check_mode(cls, config: dict, mode: str) -> None:
        if mode != ListenerMode.TCP:
            return
        if config["scope"] == "connection":
            raise FilterConfigError("scope", "tcp mode limits new connections: use scope worker")
        if config["key"] and "header" in config["key"]:
            raise FilterConfigError("key.header", "tcp mode has no headers: use downstream_address")

    def __init__(self, config: dict, context) -> None:
        super().__init__(config, context)
        bucket = config["token_bucket"]
        self.max_tokens = bucket["max_tokens"]
        self.per_fill = bucket["tokens_per_fill"]
        self.interval = bucket["fill_interval"]
        self.per_connection = config["scope"] == "connection"
        key = config["key"] or {}
        self.key_header = key["header"].encode() if "header" in key else None
        self.key_address = "downstream_address" in key
        self.max_keys = config["max_keys"]
        self.status = config["status"]
        self.grpc_status = config["grpc_status"]
        self.grpc_mode = context.mode == ListenerMode.GRPC
        self.single = (
            None if (self.key_header or self.key_address) else [float(self.max_tokens), monotonic()]
        )
        self.keyed: OrderedDict = OrderedDict()
        # Per downstream connection: keyed by the connection's socket, gone when the socket is.
        self.connections: WeakKeyDictionary = WeakKeyDictionary()

    def create(self) -> RateLimitFilter:
        return RateLimitFilter(self)

    def create_tcp(self) -> TcpRateLimit:
        return TcpRateLimit(self)

    def take(self, bucket: list, now: float) -> bool:
        """One token from `bucket` ([tokens, last fill time]), refilling first in whole fills."""
        tokens = bucket[0]
        elapsed = now - bucket[1]
        if elapsed >= self.interval:
            fills = int(elapsed / self.interval)
            tokens = min(self.max_tokens, tokens + fills * self.per_fill)
            bucket[1] += fills * self.interval
        if tokens >= 1:
            bucket[0] = tokens - 1
            self.counters[ALLOWED] += 1
            return True
        bucket[0] = tokens
        self.counters[LIMITED] += 1
        return False

    def keyed_bucket(self, buckets: OrderedDict, key, now: float) -> list:
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [float(self.max_tokens), now]
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)  # least recently used
        else:
            buckets.move_to_end(key)
        return bucket


def _peer_host(sock) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return peer[0] if isinstance(peer, tuple) else str(peer)


def _connection_socket(exchange):
    """The downstream connection's socket: HTTP/1 sessions and HTTP/2 streams (via their session)."""
    downstream = exchange.downstream
    for holder in (downstream, getattr(downstream, "session", None)):
        stream = getattr(holder, "stream", None)
        sock = getattr(stream, "sock", None)
        if sock is not None:
            return sock
    return None


class RateLimitFilter(HttpFilter):
    """The buckets live in the factory: the filter has nothing per request (one instance per worker)."""

    shared = True
    __slots__ = ("factory", "callbacks")

    def __init__(self, factory: RateLimitFactory) -> None:
        self.factory = factory

    def decode_headers(self, headers, end_stream: bool) -> int:
        factory = self.factory
        now = monotonic()
        bucket = factory.single
        if factory.per_connection or bucket is None:
            sock = None
            if factory.per_connection or factory.key_address:
                sock = _connection_socket(self.callbacks.exchange)
            if factory.key_header is not None:
                key = headers.get(factory.key_header) or _NO_KEY
            elif factory.key_address:
                key = _peer_host(sock) if sock is not None else ""
            else:
                key = _NO_KEY
            if factory.per_connection and sock is not None:
                buckets = factory.connections.get(sock)
                if buckets is None:
                    buckets = factory.connections[sock] = OrderedDict()
            else:
                buckets = factory.keyed
            bucket = factory.keyed_bucket(buckets, key, now)
        if factory.take(bucket, now):
            return CONTINUE
        grpc = None
        if factory.grpc_mode or (headers.get(b"content-type") or b"").startswith(
            b"application/grpc"
        ):
            grpc = factory.grpc_status
        self.callbacks.send_local_reply(
            factory.status, BODY, (RATELIMITED_HEADER,), grpc_status=grpc, flag="RL"
        )
        return STOP


class TcpRateLimit(TcpFilter):
    """TCP mode: one token per new connection; without one the connection is reset."""

    __slots__ = ("factory",)

    def __init__(self, factory: RateLimitFactory) -> None:
        self.factory = factory

    def on_new_connection(self, conn) -> int:
        factory = self.factory
        now = monotonic()
        bucket = factory.single
        if bucket is None:
            bucket = factory.keyed_bucket(factory.keyed, _peer_host(conn.downstream), now)
        if factory.take(bucket, now):
            return CONTINUE
        conn.close(reset=True, flag="RL")
        return STOP


RateLimitFactory.filter_class = RateLimitFilter
RateLimitFactory.tcp_filter_class = TcpRateLimit
