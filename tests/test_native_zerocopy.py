"""MSG_ZEROCOPY sends, completion reaping and ZeroCopySender accounting over real loopback TCP."""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
from byte_streams import Sink, tcp_pair
from conftest import recv_exactly

from pyproxy import native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

if native.AVAILABLE:
    from pyproxy.native.zerocopy import ZeroCopySender

lib = native.lib
ffi = native.ffi


def reap_until(z: ZeroCopySender, done, timeout: float = 10.0) -> None:
    """Reap, waiting on POLLERR (how the error queue signals), until done() or timeout."""
    poller = select.poll()
    poller.register(z.fd, 0)  # POLLERR is always reported
    deadline = time.monotonic() + timeout
    z.reap()
    while not done():
        assert time.monotonic() < deadline, f"completions missing: {z.outstanding} outstanding"
        poller.poll(20)
        z.reap()


def send_all(z: ZeroCopySender, data, timeout: float = 30.0) -> None:
    """Push all of data through the sender, waiting on POLLOUT / completions as needed."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(z.fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while view:
        n = z.send(view)
        if n:
            view = view[n:]
            continue
        assert time.monotonic() < deadline, "send stalled"
        poller.poll(20)
        z.reap()


def test_raw_completion_ranges_cover_every_send_exactly_once() -> None:
    c, s = tcp_pair()
    sink = Sink(s)
    sink.start()
    try:
        c.setblocking(False)
        assert lib.pp_zc_enable(c.fileno()) == 0
        payloads = [os.urandom(1 + 997 * i) for i in range(64)]
        keep = [ffi.from_buffer(p) for p in payloads]  # pinned for the whole test
        sent = 0
        for p, cp in zip(payloads, keep, strict=True):
            off = 0
            deadline = time.monotonic() + 10
            while off < len(p):
                assert time.monotonic() < deadline
                r = lib.pp_zc_send(c.fileno(), cp + off, len(p) - off)
                if r > 0:
                    off += r
                    sent += 1
                else:
                    assert r == -errno.EAGAIN
                    select.select([], [c], [], 0.05)
        c.shutdown(socket.SHUT_WR)
        sink.join(10)
        assert sink.count == sum(map(len, payloads))

        lo, hi, cp_ = ffi.new("uint32_t[4]"), ffi.new("uint32_t[4]"), ffi.new("int[4]")
        seen: list[int] = []
        copied = 0
        deadline = time.monotonic() + 10
        while len(seen) < sent:
            assert time.monotonic() < deadline, f"only {len(seen)}/{sent} completions"
            k = lib.pp_zc_reap(c.fileno(), lo, hi, cp_, 4)
            assert k >= 0
            if k == 0:
                select.select([], [], [c], 0.05)
            for i in range(k):
                seen.extend(range(lo[i], hi[i] + 1))
                copied += (hi[i] - lo[i] + 1) * cp_[i]
        assert seen == list(range(sent))  # in order, no gap, no overlap
        assert lib.pp_zc_reap(c.fileno(), lo, hi, cp_, 4) == 0
        # Loopback delivers to a local socket, which always forces a copy.
        assert copied == sent
    finally:
        c.close()
        s.close()


def test_buffers_stay_alive_until_their_completion_is_reaped() -> None:
    c, s = tcp_pair()
    try:
        c.setblocking(False)
        released: list[int] = []
        z = ZeroCopySender(c, reap_every=1 << 30, on_release=lambda obj: released.append(obj[0]))
        chunk = 32 * 1024
        refs = []
        for i in range(8):
            buf = array.array("B", bytes([i]) * chunk)  # weakref-able, unlike bytes
            assert z.send(buf) == chunk
            refs.append(weakref.ref(buf))
            del buf
        gc.collect()
        # The peer has not read: on loopback the kernel mostly holds the pages until it does (it
        # may complete a send early when it coalesces); whatever is not completed must be alive.
        z.reap()
        assert z.outstanding + z.completed == 8 and z.outstanding_bytes == z.outstanding * chunk
        gc.collect()
        assert [r() is not None for r in refs] == [i >= z.completed for i in range(8)]

        # Let the peer read the first 3 buffers: only completed ones may be released.
        assert recv_exactly(s, 3 * chunk, timeout=10) == b"".join(
            bytes([i]) * chunk for i in range(3)
        )
        deadline = time.monotonic() + 5
        while z.completed < 3 and time.monotonic() < deadline:
            select.select([], [], [c], 0.05)
            z.reap()
        gc.collect()
        alive = [r() is not None for r in refs]
        assert alive == [i >= z.completed for i in range(8)]
        assert z.outstanding == 8 - z.completed
        assert z.outstanding_bytes == z.outstanding * chunk

        recv_exactly(s, 5 * chunk, timeout=10)
        reap_until(z, lambda: z.outstanding == 0)
        gc.collect()
        assert all(r() is None for r in refs)
        assert released == list(range(8))
        assert (z.zc_sends, z.completed, z.copied, z.outstanding_bytes) == (8, 8, 8, 0)
    finally:
        c.close()
        s.close()


def test_small_sends_below_min_size_are_plain_and_not_pinned() -> None:
    c, s = tcp_pair()
    try:
        c.setblocking(False)
        z = ZeroCopySender(c, min_size=4096)
        assert z.send(b"a" * 100) == 100
        assert (z.plain_sends, z.zc_sends, z.outstanding) == (1, 0, 0)
        assert z.send(b"b" * 8192) == 8192
        assert (z.plain_sends, z.zc_sends, z.outstanding) == (1, 1, 1)
        assert recv_exactly(s, 8292, timeout=10) == b"a" * 100 + b"b" * 8192
        reap_until(z, lambda: z.outstanding == 0)
    finally:
        c.close()
        s.close()


def test_long_transfer_stays_within_the_outstanding_window() -> None:
    psutil = pytest.importorskip("psutil")
    total, chunk, window = 256 << 20, 256 << 10, 4 << 20
    base = os.urandom(1 << 20)
    c, s = tcp_pair()
    sink = Sink(s)
    sink.start()
    proc = psutil.Process()
    try:
        c.setblocking(False)
        z = ZeroCopySender(c, max_outstanding_bytes=window, reap_every=16)
        poller = select.poll()
        poller.register(c, select.POLLOUT)
        rss0 = proc.memory_info().rss
        max_out = max_rss = 0
        sent = 0
        deadline = time.monotonic() + 90
        while sent < total:
            off = sent % len(base)
            # A fresh object per chunk: leaked pins would show up as RSS growth.
            data = base[off : off + chunk]
            view = memoryview(data)
            while view:
                assert time.monotonic() < deadline, f"stalled at {sent}"
                n = z.send(view)
                if n:
                    view = view[n:]
                    sent += n
                else:
                    poller.poll(10)
                    z.reap()
                max_out = max(max_out, z.outstanding_bytes)
            del data, view
            if sent % (16 << 20) == 0:
                max_rss = max(max_rss, proc.memory_info().rss - rss0)
        c.shutdown(socket.SHUT_WR)
        sink.join(60)
        reap_until(z, lambda: z.outstanding == 0)
    finally:
        c.close()
        s.close()
    expected = hashlib.sha256()
    for _ in range(total // len(base)):
        expected.update(base)
    assert sink.count == total
    assert sink.hash.digest() == expected.digest()
    assert max_out <= window + chunk
    assert max_rss < 64 << 20, f"RSS grew {max_rss >> 20} MiB"
    assert z.completed == z.zc_sends > 0
    assert z.outstanding_bytes == 0


def test_pending_completions_raise_pollerr_even_when_only_pollin_is_asked() -> None:
    c, s = tcp_pair()
    try:
        c.setblocking(False)
        z = ZeroCopySender(c, reap_every=1 << 30)
        z.send(b"x" * 10000)
        recv_exactly(s, 10000, timeout=10)
        poller = select.poll()
        poller.register(c, select.POLLIN)
        deadline = time.monotonic() + 5
        events = 0
        while not events and time.monotonic() < deadline:
            events = dict(poller.poll(50)).get(c.fileno(), 0)
        assert events & select.POLLERR
        z.reap()
        assert poller.poll(0) == []
    finally:
        c.close()
        s.close()


def _pending_completion() -> tuple[socket.socket, socket.socket, ZeroCopySender]:
    """A zerocopy socket whose error queue holds one unreaped completion (POLLERR raised)."""
    c, s = tcp_pair()
    c.setblocking(False)
    z = ZeroCopySender(c, reap_every=1 << 30)
    z.send(b"x" * 10000)
    recv_exactly(s, 10000, timeout=10)
    p = select.poll()
    p.register(c, 0)
    deadline = time.monotonic() + 5
    while not p.poll(20):
        assert time.monotonic() < deadline, "no completion"
    return c, s, z


def _asyncio_reader_calls(reap_in_callback: bool) -> int:
    loop = asyncio.SelectorEventLoop()
    c, s, z = _pending_completion()
    calls = 0

    def on_readable() -> None:
        nonlocal calls
        calls += 1
        if reap_in_callback and z.outstanding:
            z.reap()
        try:
            c.recv(100)
        except BlockingIOError:
            pass

    try:
        loop.add_reader(c.fileno(), on_readable)
        loop.run_until_complete(asyncio.sleep(0.1))
        loop.remove_reader(c.fileno())
    finally:
        loop.close()
        c.close()
        s.close()
    return calls


def test_asyncio_reader_spins_on_pending_completions_unless_it_reaps() -> None:
    spinning = _asyncio_reader_calls(reap_in_callback=False)
    assert spinning > 20, spinning  # selectors map POLLERR to readable: a busy loop
    assert _asyncio_reader_calls(reap_in_callback=True) == 1


def _uvloop_reader_gets_data(rearm: bool) -> list[bytes | None]:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    c, s, z = _pending_completion()
    got: list[bytes | None] = []
    seen = z.notifications

    def on_readable() -> None:
        nonlocal seen
        if z.outstanding:
            z.reap()
        if rearm and z.notifications != seen:
            # libuv stopped this poll handle when it saw POLLERR: register afresh.
            seen = z.notifications
            loop.remove_reader(c.fileno())
            loop.add_reader(c.fileno(), on_readable)
        try:
            got.append(c.recv(100))
        except BlockingIOError:
            got.append(None)

    try:
        loop.add_reader(c.fileno(), on_readable)
        loop.run_until_complete(asyncio.sleep(0.05))
        s.sendall(b"after")
        loop.run_until_complete(asyncio.sleep(0.1))
    finally:
        loop.close()
        c.close()
        s.close()
    return got


def test_uvloop_reader_dies_on_pollerr_unless_rearmed_after_reaping() -> None:
    # libuv's uv_poll stops itself on POLLERR: the reader runs once, then never
    # again, even for real data. Reaping alone does not bring it back.
    assert _uvloop_reader_gets_data(rearm=False) == [None]
    assert _uvloop_reader_gets_data(rearm=True) == [None, b"after"]


def test_foreign_zerocopy_send_on_the_socket_is_detected() -> None:
    c, s = tcp_pair()
    try:
        c.setblocking(False)
        assert lib.pp_zc_enable(c.fileno()) == 0
        assert lib.pp_zc_send(c.fileno(), ffi.from_buffer(b"z" * 5000), 5000) == 5000
        z = ZeroCopySender(c)  # starts counting at 0, but sequence 0 is already used
        recv_exactly(s, 5000, timeout=10)
        with pytest.raises(RuntimeError, match="another sender"):
            reap_until(z, lambda: False, timeout=5)
    finally:
        c.close()
        s.close()


# --- ENOBUFS: option memory exhausted, inside a private network namespace -------------

_NETNS_CHILD = textwrap.dedent(
    """
    import errno, hashlib, json, os, select, socket, sys, threading, time
    from pyproxy import native
    from pyproxy.native.zerocopy import ZeroCopySender

    with open("/proc/sys/net/core/optmem_max", "w") as f:
        f.write(sys.argv[1])
    stall = sys.argv[2] == "stall"
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    c.setblocking(False)
    z = ZeroCopySender(c, reap_every=1 << 30)
    chunks = [os.urandom(65536) for _ in range(32)]
    got = hashlib.sha256()
    count = 0
    go = threading.Event()

    def sink():
        global count
        go.wait(10)
        while True:
            b = s.recv(1 << 20)
            if not b:
                return
            got.update(b)
            count += len(b)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    if not stall:
        go.set()
    raw = native.lib.pp_zc_send(c.fileno(), native.ffi.from_buffer(b""), 0)
    deadline = time.monotonic() + 20
    for data in chunks:
        view = memoryview(data)
        while view:
            assert time.monotonic() < deadline
            n = z.send(view)
            view = view[n:]
            if not n:
                go.set()  # the stalled peer may start reading now
                select.select([], [c], [], 0.02)
        if count == 0 and z.fallbacks >= 4:
            go.set()
    go.set()
    c.shutdown(socket.SHUT_WR)
    t.join(20)
    while z.outstanding and time.monotonic() < deadline:
        select.select([], [], [c], 0.02)
        z.reap()
    print(json.dumps({
        "ok": got.digest() == hashlib.sha256(b"".join(chunks)).digest(),
        "count": count, "zc_sends": z.zc_sends, "plain_sends": z.plain_sends,
        "fallbacks": z.fallbacks, "completed": z.completed, "outstanding": z.outstanding,
        "outstanding_bytes": z.outstanding_bytes,
    }))
    """
)


def _run_in_netns(optmem: int, mode: str) -> dict:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n not permitted: {probe.stderr.decode().strip()}")
    # lo starts down in a new namespace; optmem_max is per namespace, the host's is untouched.
    script = 'ip link set lo up && exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, sys.executable, _NETNS_CHILD, str(optmem), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_enobufs_falls_back_to_copy_for_every_send_when_optmem_is_zero() -> None:
    host_optmem = open("/proc/sys/net/core/optmem_max").read()
    r = _run_in_netns(0, "flow")
    assert r["ok"] and r["count"] == 32 * 65536
    assert r["zc_sends"] == 0 and r["completed"] == 0
    assert r["fallbacks"] == r["plain_sends"] >= 32
    assert open("/proc/sys/net/core/optmem_max").read() == host_optmem


def test_enobufs_mid_stream_keeps_sequence_accounting_exact() -> None:
    # 1 KiB of option memory admits one pinned send at a time while the peer
    # stalls; the rest hit ENOBUFS and go by copy. Failed sends consume no
    # sequence number, so completions must still match the zerocopy sends.
    r = _run_in_netns(1024, "stall")
    assert r["ok"] and r["count"] == 32 * 65536
    assert r["zc_sends"] >= 1 and r["fallbacks"] >= 1
    assert r["completed"] == r["zc_sends"]
    assert r["outstanding"] == 0 and r["outstanding_bytes"] == 0
