"""MSG_ZEROCOPY sender that pins every buffer until the kernel reports the send complete.

How MSG_ZEROCOPY works, and what this class does about each part:

* Each successful ``send(MSG_ZEROCOPY)`` call gets the next 32-bit sequence
  number (per socket, from 0; a failed call consumes none). The kernel keeps
  pointing at the caller's pages until the data is acknowledged, so the
  buffer must not be freed, resized or written to before then. ``send``
  keeps the object and a ``ffi.from_buffer`` export of it (which also stops a
  ``bytearray`` from being resized) in a FIFO until its number is reported.
* Completions arrive on the socket's error queue as ranges ``[lo, hi]``
  (coalesced when contiguous), flagged "copied" when the kernel copied after
  all (always on loopback, where delivery to a local socket must copy).
  ``reap`` reads them and releases exactly the covered sends.
* Unread notifications use the socket's option memory (net.core.optmem_max);
  when it runs out, ``send`` fails with ENOBUFS. ``send`` then reaps, retries
  once and otherwise sends by copy, so data is never refused for this reason.

Reaping from an event loop (asyncio has no ``add_error_reader``):

A non-empty error queue makes the socket report POLLERR, and epoll reports
POLLERR whether or not it was asked for. What the loops do with it (pinned by
tests/test_native_zerocopy.py):

* asyncio's selector loop turns it into read *and* write readiness: a reader
  callback that only does ``recv`` (EAGAIN) is called again and again, a busy
  loop, until the queue is reaped.
* uvloop (libuv ``uv_poll``) runs the reader callback once and then *stops
  the poll handle*: the reader never fires again, not even for data, and
  reaping does not restart it. The callback must reap and then re-register
  (``remove_reader`` + ``add_reader``, and the writer if one is registered).
  Decide by ``notifications`` having changed since the last re-registration,
  not by what this call's ``reap`` returned: another callback in the same
  loop iteration may already have reaped (``send`` reaps too).
* Transports (``create_connection``/``connect_accepted_socket``) on either
  loop have no such hook: unreaped completions keep the loop spinning at
  100% CPU. Use MSG_ZEROCOPY only on sockets driven by add_reader/add_writer.

So the integration should:

1. at the start of the zerocopy socket's read-ready callback, ``reap()`` when
   ``outstanding`` is non-zero (this is the "error reader"), then re-arm on
   uvloop as above;
2. rely on ``send`` reaping on its own every ``reap_every`` zerocopy sends,
   on ENOBUFS, and when the ``max_outstanding_bytes`` window is full (then
   ``send`` returns 0 and ``window_full`` is True: wait for the read callback
   or a short timer);
3. arm a timer (a few ms) while ``outstanding`` is non-zero and no reader is
   registered (e.g. a half-closed downstream), and before closing: drain with
   ``reap`` until ``outstanding == 0`` or abort the connection with a reset, so
   no pinned buffer is released while the kernel may still transmit from it.

On loopback a send completes only once the *receiver has read* the data
(the kernel's deferred copy), so for app<->sidecar IPC the pinned window is
as large as what the peer application leaves unread.

The sender must own every MSG_ZEROCOPY send on its socket from the socket's
first one, or the sequence numbers will not line up (``reap`` raises).
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import AVAILABLE, EAGAIN, ENOBUFS, UNAVAILABLE_REASON, ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from 3.12 on

__all__ = ["ZeroCopySender"]

_U32 = 0xFFFFFFFF


class ZeroCopySender:
    """Sends through MSG_ZEROCOPY on one non-blocking socket and accounts for completions.

    Counters (plain ints, read them at scrape time): ``zc_sends`` sends that
    went zerocopy, ``plain_sends`` sends that went by copy (below
    ``min_size`` or after ENOBUFS), ``fallbacks`` the ENOBUFS subset of those,
    ``completed`` zerocopy sends the kernel reported done, ``copied`` the subset
    it reported it had copied anyway, ``notifications`` error-queue messages read.
    """

    __slots__ = (
        "fd",
        "min_size",
        "max_outstanding_bytes",
        "reap_every",
        "on_release",
        "outstanding_bytes",
        "zc_sends",
        "plain_sends",
        "fallbacks",
        "completed",
        "copied",
        "notifications",
        "_pending",
        "_head",
        "_next",
        "_early",
        "_lo",
        "_hi",
        "_cp",
        "_batch",
        "_until_reap",
    )

    def __init__(
        self,
        sock: socket.socket | int,
        *,
        min_size: int = 0,
        max_outstanding_bytes: int = 8 << 20,
        reap_every: int = 32,
        reap_batch: int = 64,
        on_release: Callable[[Any], None] | None = None,
    ) -> None:
        if not AVAILABLE:
            raise RuntimeError(f"pyproxy.native unavailable: {UNAVAILABLE_REASON}")
        self.fd = sock if isinstance(sock, int) else sock.fileno()
        rc = lib.pp_zc_enable(self.fd)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        # Below min_size the page pinning and notification cost more than the copy.
        self.min_size = min_size
        self.max_outstanding_bytes = max_outstanding_bytes
        self.reap_every = reap_every
        # Called with each sent object once the kernel is done with it, e.g. to
        # return a buffer to a pool: reuse before that would corrupt the stream.
        self.on_release = on_release
        self.outstanding_bytes = 0
        self.zc_sends = 0
        self.plain_sends = 0
        self.fallbacks = 0
        self.completed = 0
        self.copied = 0
        self.notifications = 0
        # FIFO of (object, pin, nbytes) for sequence numbers _head .. _next-1;
        # sequence numbers are contiguous, so an entry's index is seq - _head.
        self._pending: collections.deque[tuple[Any, Any, int]] = collections.deque()
        self._head = 0
        self._next = 0
        # Sequence numbers completed ahead of _head (out-of-order completions).
        self._early: set[int] = set()
        self._batch = reap_batch
        self._until_reap = reap_every
        self._lo = ffi.new("uint32_t[]", reap_batch)
        self._hi = ffi.new("uint32_t[]", reap_batch)
        self._cp = ffi.new("int[]", reap_batch)

    @property
    def outstanding(self) -> int:
        """Zerocopy sends not yet reported complete (their buffers are pinned)."""
        return len(self._pending)

    @property
    def window_full(self) -> bool:
        return self.outstanding_bytes >= self.max_outstanding_bytes

    def send(self, data: Buffer) -> int:
        """Send what the socket takes of ``data``: bytes accepted, 0 if it would block.

        0 also when the outstanding window is full (``window_full``); either way
        retry later. Unexpected socket errors raise OSError.
        """
        pin = ffi.from_buffer(data)
        n = len(pin)
        if n < self.min_size or n == 0:
            return self._send_plain(pin, n)
        if self.outstanding_bytes >= self.max_outstanding_bytes:
            self.reap()
            if self.outstanding_bytes >= self.max_outstanding_bytes:
                return 0
        r = lib.pp_zc_send(self.fd, pin, n)
        if r == ENOBUFS:
            # Option memory is held by unread notifications: read them and retry.
            self.reap()
            r = lib.pp_zc_send(self.fd, pin, n)
            if r == ENOBUFS:
                self.fallbacks += 1
                return self._send_plain(pin, n)
        if r > 0:
            self._pending.append((data, pin, r))
            self._next = (self._next + 1) & _U32
            self.outstanding_bytes += r
            self.zc_sends += 1
            # Every reap_every sends, not whenever reap_every are pending: on a
            # slow peer that would be one extra empty recvmsg per send.
            self._until_reap -= 1
            if not self._until_reap:
                self._until_reap = self.reap_every
                self.reap()
            return r
        if r == EAGAIN:
            return 0
        raise OSError(-r, os.strerror(-r))

    def _send_plain(self, pin: Any, n: int) -> int:
        r = lib.pp_send(self.fd, pin, n)
        if r >= 0:
            if r:
                self.plain_sends += 1
            return r
        if r == EAGAIN:
            return 0
        raise OSError(-r, os.strerror(-r))

    def reap(self) -> int:
        """Read all waiting completions; release the covered buffers; return sends completed."""
        done = 0
        while True:
            k = lib.pp_zc_reap(self.fd, self._lo, self._hi, self._cp, self._batch)
            if k < 0:
                raise OSError(-k, os.strerror(-k))
            for i in range(k):
                done += self._complete(self._lo[i], self._hi[i], self._cp[i])
            self.notifications += k
            if k < self._batch:
                return done

    def _complete(self, lo: int, hi: int, copied: int) -> int:
        count = ((hi - lo) & _U32) + 1
        offset = (lo - self._head) & _U32
        if offset + count > len(self._pending):
            raise RuntimeError(
                f"zerocopy completion {lo}..{hi} outside pending "
                f"{self._head}..{(self._next - 1) & _U32}: another sender on fd {self.fd}?"
            )
        self.completed += count
        if copied:
            self.copied += count
        if offset:
            # Completions are usually in order; when not, remember the range and
            # release it once everything before it has completed too.
            for j in range(count):
                self._early.add((lo + j) & _U32)
            return count
        self._release(count)
        early = self._early
        while early and self._head in early:
            early.discard(self._head)
            self._release(1)
        return count

    def _release(self, count: int) -> None:
        pending = self._pending
        on_release = self.on_release
        freed = 0
        for _ in range(count):
            obj, pin, nbytes = pending.popleft()
            freed += nbytes
            if on_release is not None:
                on_release(obj)
        self.outstanding_bytes -= freed
        self._head = (self._head + count) & _U32
