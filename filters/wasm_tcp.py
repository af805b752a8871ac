"""The wasm filter on a TCP listener: one connection's stream context, with Envoy's network-filter callbacks.

As Envoy's host (its wasm network filter) calls them: `proxy_on_new_connection` when the
connection is accepted, before the upstream connect (Pause holds the connect until the guest
calls `proxy_continue_stream(DOWNSTREAM)`, or the filter's pause_timeout closes it);
`proxy_on_downstream_data` / `proxy_on_upstream_data` for each read, with the bytes readable
and writable as buffer types 2 and 3 (`proxy_get_buffer_bytes` / `proxy_set_buffer_bytes`).
Pause holds the bytes: the next callback of that direction sees what was held plus its read,
as Envoy's read buffer accumulates; Continue sends everything on (as the guest left it). Held
downstream bytes also go on when the guest calls `proxy_continue_stream(DOWNSTREAM)`; upstream
ones only on a later Continue (Envoy: continuing the upstream is UNIMPLEMENTED). A direction
holding more than HELD_LIMIT bytes closes the connection. `proxy_on_downstream_connection_close`
and `proxy_on_upstream_connection_close` come when it ends (peer type 1 local, 2 remote), then
`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`. `proxy_close_stream(DOWNSTREAM or UPSTREAM)`
closes the connection once the guest returns.
"""

from __future__ import annotations

import logging
from typing import Any

from pyproxy.filters.wasm_runtime import (
    NETWORK_DOWNSTREAM_DATA,
    OK,
    PAUSE,
    UNIMPLEMENTED,
    StreamContext,
    WasmFault,
)

from pyproxy.chain.api import CONTINUE, STOP, TcpFilter

log = logging.getLogger("pyproxy.wasm")

HELD_LIMIT = 1024 * 1024  # bytes a paused direction may hold (Envoy: the buffer limit)
LOCAL, REMOTE = 1, 2  # proxy_peer_type_t
DATA_CALLBACKS = ("proxy_on_downstream_data", "proxy_on_upstream_data")
CLOSE_CALLBACKS = ("proxy_on_downstream_connection_close", "proxy_on_upstream_connection_close")


class WasmTcpFilter(StreamContext, TcpFilter):
    """One TCP connection's context in the module."""

    # What the host functions read of a stream context that a connection does not have.
    request = response = request_trailers = response_trailers = None
    callbacks = None

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.runtime = factory.runtime
        self.context_id = 0
        self.generation = 0
        self.timer: Any = None
        self.ended_ns = 0
        self.reply: Any = None  # proxy_send_local_response: nothing to answer on a TCP stream
        self.reply_details = ""
        self.properties: dict[bytes, bytes] | None = None
        # During a data callback: the buffer type delivered (2 downstream, 3 upstream, else
        # -1), what it is built from (held bytes, the read), the bytes once built, and
        # whether the guest wrote them.
        self.body_stream = -1
        self.body_parts: tuple[list[bytes] | None, bytes] = (None, b"")
        self.body: bytearray | None = None
        self.body_changed = False
        self.held: list[list[bytes]] = [[], []]  # per direction: bytes held while paused
        self.paused = [False, False]
        self.connecting = False  # the guest paused the new connection
        self.closing = False  # proxy_close_stream(downstream or upstream): close after the call
        self.ended = False
        self.gate: Any = None  # the connection at its start (chain/tcp_chain.py's gate)
        self.stream: Any = None  # the relay, once the upstream is connected
        self.sock: Any = None

    # ---- what the host functions and attributes ask of a context ------------------------

    def downstream_socket(self):
        return self.sock

    def listener(self):
        gate = self.gate
        return gate.listener.config if gate is not None else None

    def guest_data(self) -> bytearray:
        return self.guest_body()

    def continue_stream(self, stream_type: int) -> int:
        """Downstream: the held connect or bytes go on; upstream: UNIMPLEMENTED (as Envoy);
        request and response: no-ops on a TCP stream."""
        if stream_type == 3:
            return UNIMPLEMENTED
        if stream_type == 2:
            loop = self.gate.loop
            if self.connecting:
                self.connecting = False
                self._cancel_timer()
                loop.call_soon(self.gate.continue_connecting)
            elif self.paused[0]:
                self.paused[0] = False
                loop.call_soon(self._release, True)
        return OK

    def close_stream(self, stream_type: int) -> None:
        if stream_type >= 2:
            self.closing = True

    def clear_route_cache(self) -> None:
        """No route on a TCP stream."""

    def _send_reply(self) -> int:
        self.reply = None  # a local response has no stream to go to (Envoy: a no-op)
        return CONTINUE

    # ---- the relay's and gate's calls ------------------------------------------------

    def on_new_connection(self, gate) -> int:
        self.gate, self.sock = gate, gate.downstream
        rt = self.runtime
        try:
            entered = self._enter()
            if not entered:
                return CONTINUE  # no instance now: the connection goes on without the module
            self._create()
            callback = rt.exports.get("proxy_on_new_connection")
            action = 0
            if callback is not None:
                action = rt.call_raw(callback[0], callback[1], self.context_id)
        except WasmFault as exc:
            self._fault(exc, "proxy_on_new_connection")
            return STOP
        finally:
            rt.filter = None
        if self.closing:
            gate.close("LR")
            return STOP
        if action == PAUSE:
            self.connecting = True
            self.timer = gate.loop.call_later(self.factory.pause_timeout, self._timed_out)
            return STOP
        return CONTINUE

    def on_stream(self, data, from_downstream: bool, end_stream: bool):
        """A read for the guest: what goes on (None: the read as it came; b"": held)."""
        direction = 0 if from_downstream else 1
        rt = self.runtime
        callback = rt.exports.get(DATA_CALLBACKS[direction])
        if callback is None or not self.context_id or self.generation != rt.generation:
            return self._let_go(direction, data)
        held = self.held[direction]
        size = len(data) + sum(map(len, held))
        try:
            if not self._enter():
                return self._let_go(direction, data)
            self.body, self.body_parts = None, (held, data)
            self.body_stream = NETWORK_DOWNSTREAM_DATA + direction
            self.body_changed = False
            action = rt.call_raw(callback[0], callback[1], self.context_id, size, end_stream)
        except WasmFault as exc:
            self._fault(exc, DATA_CALLBACKS[direction])
            return b""
        finally:
            rt.filter = None
            edited, self.body, self.body_parts, self.body_stream = self.body, None, (None, b""), -1
        if self.closing:
            self._close_soon()
            return b""
        if edited is not None and self.body_changed:
            held[:] = [bytes(edited)]
        elif action == PAUSE or held:
            held.append(bytes(data))
        else:
            return None  # untouched and nothing held: the read goes on as it came
        if action == PAUSE and not end_stream:
            self.paused[direction] = True
            if sum(map(len, held)) > HELD_LIMIT:
                log.warning("wasm filter %s: paused past %d bytes", rt.name, HELD_LIMIT)
                self._close_soon(reset=True)
            return b""
        self.paused[direction] = False
        out = b"".join(held)
        held.clear()
        return out

    def holding(self, from_downstream: bool) -> bool:
        direction = 0 if from_downstream else 1
        return self.paused[direction] or bool(self.held[direction])

    def on_close(self, flag: str) -> None:
        """The connection ended: the close callbacks (each side as Envoy tells it), then the
        context's end (done, log, delete)."""
        if self.ended:
            return
        self.ended = True
        self._cancel_timer()
        rt = self.runtime
        if self.runtime.calls:
            rt.cancel_calls(self)
        if not self.context_id or self.generation != rt.generation:
            return
        sides = [(CLOSE_CALLBACKS[0], REMOTE if flag in ("", "DR") else LOCAL)]
        if self.stream is not None:
            sides.append((CLOSE_CALLBACKS[1], REMOTE if flag in ("", "UR") else LOCAL))
        try:
            for name, peer in sides:
                callback = rt.exports.get(name)
                if callback is not None:
                    rt.begin(self)
                    rt.call_raw(callback[0], callback[1], self.context_id, peer)
        except WasmFault as exc:
            rt.failed(exc, name, self.factory.counters)
            return
        finally:
            rt.filter = None
        self._delete_context()

    def orphaned(self) -> None:
        """The instance holding this context was replaced: what it held goes on."""
        if self.connecting:
            self.connecting = False
            self._cancel_timer()
            self.gate.loop.call_soon(self.gate.continue_connecting)
        for direction in (0, 1):
            if self.paused[direction] or self.held[direction]:
                self.paused[direction] = False
                self.gate.loop.call_soon(self._release, direction == 0)

    # ---- inside --------------------------------------------------------------------

    def _let_go(self, direction: int, data):
        """No guest call for this read: anything held goes first."""
        held = self.held[direction]
        if not held:
            return None
        held.append(bytes(data))
        out = b"".join(held)
        held.clear()
        return out

    def _release(self, from_downstream: bool) -> None:
        held = self.held[0 if from_downstream else 1]
        data = b"".join(held)
        held.clear()
        if self.stream is not None:
            self.stream.release(self, data, from_downstream)

    def _close_soon(self, reset: bool = False) -> None:
        """Close the connection after the current guest call (Envoy defers it too)."""
        self.gate.loop.call_soon(self._close, reset)

    def _close(self, reset: bool = False) -> None:
        if self.stream is not None:
            self.stream.close("LR", reset)
        else:
            self.gate.close("LR", reset)

    def _fault(self, exc: WasmFault, where: str) -> None:
        self.runtime.failed(exc, where, self.factory.counters)
        self._close_soon(reset=True)

    def _timed_out(self) -> None:
        self.timer = None
        self.connecting = False
        self.factory.counters[3] += 1  # pause_timeouts
        self._close()
