"""Relay directions whose readiness callback runs whole in C: the plain read-then-write step and its accounts.

The event loop calls the native step (pp_copy_step / pp_splice_step, see
native/pyproxy_native.h) directly with the direction's C struct, so a
readable socket costs one C call and no Python frame: it reads into the
worker's shared buffer (or splices into its shared pipe), writes it on at
once, goes again while a read filled the buffer, and adds the same stage
and byte counters the Python relay adds (io/relay.py, `_received`/`_sent`).
Everything that is not that plain step, a destination that did not take
everything, EOF, a failed call, comes back to Python here, once, and
Python carries on exactly as io/relay.py does: park the rest and watch the
destination, pass the half-close on, or reset the other side.

A native direction takes buffers from a pool of its own (`Scratch`), whose
top the C structs point at, so a pure-Python relay taking a buffer from the
general pool can never pull the buffer out from under C.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

from pyproxy import native  # type: ignore[attr-defined]  # mapped from native/ by pyproject
from pyproxy.counters import MESSAGES
from pyproxy.io.buffer_pool import Pool, copy_buffer
from pyproxy.io.relay import DOWNSTREAM, NOTIFY_EVENTS, UPSTREAM, Relay, _Direction

log = logging.getLogger("pyproxy.relay")

ffi, lib = native.ffi, native.lib
PARKED, EOF, SRC_FAILED, DST_FAILED = (
    lib.PP_STEP_PARKED,
    lib.PP_STEP_EOF,
    lib.PP_STEP_SRC_FAILED,
    lib.PP_STEP_DST_FAILED,
)


class Scratch:
    """A pool's top item as the C steps see it (struct pp_scratch), kept current as items are taken."""

    __slots__ = ("pool", "c", "_keep", "_pipes", "broken")

    def __init__(self, pool: Pool[Any], pipes: bool) -> None:
        self.pool = pool
        self.c = ffi.new("struct pp_scratch *")
        self._keep: Any = None  # the cdata over the top buffer, alive while C points at it
        self._pipes = pipes
        self.broken = False  # the pool could not make a new top (e.g. EMFILE for a pipe)
        self.refresh()

    def refresh(self) -> None:
        """Point C at the pool's top; on failure C's calls fail with EBADF until a refresh works."""
        c = self.c
        try:
            top = self.pool.top()
        except OSError as exc:
            log.warning("relay: no new %s: %s", "pipe" if self._pipes else "buffer", exc)
            c.pipe_rd = c.pipe_wr = -1
            c.buf, c.len, self._keep = ffi.NULL, 0, None
            self.broken = True
            return
        self.broken = False
        if self._pipes:
            c.pipe_rd, c.pipe_wr, c.len = top
        else:
            self._keep = ffi.from_buffer(top[0])
            c.buf, c.len = self._keep, len(top[0])

    def take(self) -> Any:
        """Keep the top item (C just left bytes in it) and point C at the next one."""
        item = self.pool.take()
        self.refresh()
        return item

    def give(self, item: Any) -> None:
        """An emptied item comes back; it may become the top, so C is pointed at the top again."""
        self.pool.give(item)
        self.refresh()


_COPY_SCRATCH: dict[int, Scratch] = {}


def copy_scratch(size: int) -> Scratch:
    """This process's native copy directions' buffers of `size` bytes (a pool of their own)."""
    scratch = _COPY_SCRATCH.get(size)
    if scratch is None:
        scratch = _COPY_SCRATCH[size] = Scratch(Pool(copy_buffer(size)), pipes=False)
    return scratch


def block_pointer(block: memoryview) -> Any:
    """The address of a listener's counter block, for _native's C (native.block_pointer)."""
    return native.block_pointer(block, ffi)


@ffi.def_extern()
def pp_step_event(handle: Any, status: int) -> None:
    """A native step's hand-over (anything but the plain step): the direction carries on in Python."""
    direction: NativeDirection = ffi.from_handle(handle)
    try:
        direction.on_step_event(status)
    except Exception:  # the event loop must survive any bug here: this connection does not
        log.exception("relay: hand-over from the native step failed")
        direction.relay.close(flag="LR", reset=True)


class NativeDirection(_Direction):
    """One way of a relay whose readable callback is the C step; the rest as in io/relay.py."""

    __slots__ = ("c", "scratch", "step", "_handle")

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        scratch: Scratch,
        step: Callable[[Any], None],
        src_side: str,
        app_side: str,
    ) -> None:
        super().__init__(relay, src, dst, 0, src_side, app_side)
        self.scratch, self.step = scratch, step
        c = self.c = ffi.new("struct pp_dir *")
        c.src_fd, c.dst_fd = self.src_fd, self.dst_fd
        c.scratch = scratch.c
        c.block = block_pointer(relay.block)
        c.timed = relay.timed
        c.read_ns, c.read_events = self.read_ns, self.read_events
        c.write_ns, c.write_events = self.write_ns, self.write_events
        c.notify_events = NOTIFY_EVENTS
        c.rx, c.tx = self.rx, self.tx
        c.messages = MESSAGES if self.is_request else -1
        self._handle = ffi.new_handle(self)
        c.handle = self._handle

    def on_readable(self) -> None:
        self.step(self.c)

    def arm_reader(self) -> None:
        self.relay.loop.add_reader(self.src_fd, self.step, self.c)

    def progress(self) -> int:
        return self.moved + self.c.moved

    def on_step_event(self, status: int) -> None:
        c, relay = self.c, self.relay
        if status == PARKED:
            self.park(self.scratch.take(), c.got, c.sent)
            loop = relay.loop
            loop.remove_reader(self.src_fd)
            loop.add_writer(self.dst_fd, self.on_writable)
        elif status == EOF:
            self.eof = True
            self._stop_reading()
            self._shutdown_dst()
        elif status == SRC_FAILED:
            if c.err == errno.EBADF and self.scratch.broken:
                self.scratch.refresh()
                if self.scratch.broken:  # no buffer or pipe to be had: refuse this one
                    relay.close(flag="LR", reset=True)
                return
            relay.reset_by(self.src_side)
        elif status == DST_FAILED:
            # What was read is still in the scratch (a pipe keeps it): take it out of the pool,
            # so the next connection never writes it; the reset's release drops it.
            self.park(self.scratch.take(), c.got, 0)
            relay.reset_by(self.dst_side)

    def park(self, item: Any, got: int, sent: int) -> None:
        """Keep `item` (the buffer or pipe the step used): got - sent of its bytes wait for dst."""
        raise NotImplementedError

    def finish(self) -> None:
        super().finish()
        # The handle keeps this direction alive while C may call back; once the relay is closed
        # no step runs again, so the cycle direction -> handle -> direction is broken here.
        self.c.handle = ffi.NULL
        self._handle = None


class _CopyDirection(NativeDirection):
    """The userspace copy through the native step; parked bytes wait in a buffer of its own."""

    __slots__ = ()

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, buffer_size: int,
                 src_side: str, app_side: str) -> None:  # fmt: skip
        scratch = copy_scratch(buffer_size)
        super().__init__(relay, src, dst, scratch, lib.pp_copy_step, src_side, app_side)

    def park(self, item: Any, got: int, sent: int) -> None:
        self.held = item
        self.view = item[1]
        self.start, self.end = sent, got

    def release(self) -> None:
        if self.held is not None:
            self.scratch.give(self.held)  # through the scratch: it may be the new top
        self.held = self.view = None


class NativeCopyRelay(Relay):
    """The default TCP-mode relay when the native module is there: the copy step runs in C."""

    __slots__ = ()

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        down, up = self.downstream, self.upstream
        return (
            _CopyDirection(self, down, up, buffer_size, DOWNSTREAM, app_side),
            _CopyDirection(self, up, down, buffer_size, UPSTREAM, app_side),
        )


class _PolledCopyDirection(_CopyDirection):
    """The copy direction whose step libuv runs from its own poll (pp_poll_read), while the
    relay is plain; anything else hands the relay back to the loop's readers and writers."""

    __slots__ = ()

    def arm_reader(self) -> None:
        relay = cast(PolledCopyRelay, self.relay)
        if relay.uv_loop is not None and lib.pp_poll_read(self.c, relay.uv_loop) == 0:
            _POLLED.add(relay)
            return
        super().arm_reader()

    def on_step_event(self, status: int) -> None:
        cast(PolledCopyRelay, self.relay).to_loop()
        super().on_step_event(status)


class PolledCopyRelay(NativeCopyRelay):
    """The copy relay with `relay_dispatch: libuv`: a readable socket runs the C step straight
    from libuv's poll callback, with no Python frame, cffi call or GIL hand-over per wake-up.

    Only the plain step runs there. The first hand-over (a parked rest, EOF, a failure) and
    the close give the relay back to the loop for good (to_loop): the polls are closed before
    the loop watches those fds or they are closed, since one fd takes one watcher.
    """

    __slots__ = ("uv_loop",)

    def __init__(self, loop, *args, **kwargs) -> None:
        self.uv_loop = uv_loop_pointer(loop)
        super().__init__(loop, *args, **kwargs)

    def _directions(self, buffer_size: int, app_side: str) -> tuple[_Direction, _Direction]:
        down, up = self.downstream, self.upstream
        return (
            _PolledCopyDirection(self, down, up, buffer_size, DOWNSTREAM, app_side),
            _PolledCopyDirection(self, up, down, buffer_size, UPSTREAM, app_side),
        )

    def to_loop(self) -> None:
        """Close both polls; a direction that was reading through one reads through the loop."""
        if self.uv_loop is None:
            return
        self.uv_loop = None
        _POLLED.discard(self)
        for direction in (self._request, self._response):
            c = direction.c  # type: ignore[attr-defined]
            if c.poll != ffi.NULL:
                lib.pp_poll_close(c)
                if not self._closed:
                    direction.arm_reader()

    def _close_sockets(self, reset: bool) -> None:
        self.to_loop()
        super()._close_sockets(reset)


# Relays with a libuv poll open. An open poll keeps libuv's loop running, and the loop's
# close runs it once more to the end: release_polls hands them back to the loop first.
_POLLED: set[PolledCopyRelay] = set()


def release_polls() -> None:
    """Give every relay still on a libuv poll back to its loop (before that loop closes)."""
    for relay in list(_POLLED):
        relay.to_loop()


_UV_LOOP: tuple[Any, Any] = (None, None)  # (loop, its uv_loop_t*): a worker runs one loop


def uv_loop_pointer(loop: Any) -> Any:
    """The loop's uv_loop_t* for pp_poll_read, or None where libuv cannot be reached (a loop
    other than uvloop's, or its module without the libuv calls the step needs)."""
    global _UV_LOOP
    if _UV_LOOP[0] is not loop:
        _UV_LOOP = (loop, _find_uv_loop(loop))
    return _UV_LOOP[1]


def _find_uv_loop(loop: Any) -> Any:
    try:
        import uvloop.loop  # type: ignore[import-not-found]  # the loop's own module
    except ImportError:
        return None
    if not isinstance(loop, uvloop.loop.Loop) or lib.pp_uv_bind(uvloop.loop.__file__.encode()):
        log.warning("relay_dispatch libuv: not on uvloop's libuv here; the loop runs the step")
        return None
    capsule = uvloop.loop.libuv_get_loop_t_ptr(loop)  # type: ignore[attr-defined]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return ffi.cast("void *", get_pointer(capsule, None))
