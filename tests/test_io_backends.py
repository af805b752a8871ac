"""I/O backends through a real proxy process: every ipc x write x relay combination that makes sense.

Byte-exact transfers both ways with half-closes, zero-copy completion
accounting in /stats, bounded memory under a long transfer, and the
pure-Python fallback when the native module is disabled.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from byte_streams import (
    AFTER_EOF,
    CONCURRENT,
    UnixServer,
    app_handler,
    digest_of,
    exchange,
    flood_handler,
)
from conftest import ThreadedServer, free_port, http_get

from pyproxy import native

MB = 1024 * 1024
HEADER_BYTES = 9
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=str(native.UNAVAILABLE_REASON))

BACKENDS = {
    # The default: with the native module on uvloop, libuv runs the copy step (auto).
    "copy": (
        (),
        {
            "relay": "userspace-copy",
            "write": "send",
            "relay_step": "native" if native.AVAILABLE else "python",
            **({"relay_dispatch": "libuv"} if native.AVAILABLE else {}),
        },
    ),
    # The copy step run by the event loop's readers (the default before libuv's measured ahead).
    "copy_loop": (
        ("--relay-dispatch", "loop"),
        {
            "relay": "userspace-copy",
            "write": "send",
            "relay_step": "native",
            "relay_dispatch": "loop",
        },
    ),
    "zerocopy": (
        ("--write", "zerocopy"),
        {"relay": "userspace-copy", "write": "zerocopy", "relay_step": "python"},
    ),
    "splice": (("--relay", "splice"), {"relay": "splice", "write": "send", "relay_step": "native"}),
    # The copy step run from libuv's own poll callback, chosen explicitly.
    "copy_libuv": (
        ("--relay-dispatch", "libuv"),
        {
            "relay": "userspace-copy",
            "write": "send",
            "relay_step": "native",
            "relay_dispatch": "libuv",
        },
    ),
}
# (request bytes, reply bytes, when the app replies): tiny, just over one buffer, bulk both ways
# at once, and a reply whose FIN overtakes a still-streaming request.
CASES = (
    (1, 1, AFTER_EOF),
    (64 * 1024 + 1, 64 * 1024 + 1, AFTER_EOF),
    (64 * MB, 64 * MB, CONCURRENT),
    (8 * MB, 1, CONCURRENT),
)


@functools.cache
def _digest(size: int, seed: int) -> str:
    return digest_of(size, seed)


def _app(ipc: str, directory: Path, results: list):
    if ipc == "uds":
        return UnixServer(str(directory / "app.sock"), app_handler(results))
    return ThreadedServer(app_handler(results))


def _server_info(proxy) -> dict:
    status, body = http_get(proxy.admin + "/server_info")
    assert status == 200
    return json.loads(body)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("ipc", ["tcp", "uds"])
def test_transfers_are_byte_exact_with_half_close_on_every_backend(
    start_proxy, short_dir, ipc, backend
):
    if backend != "copy" and not native.AVAILABLE:
        pytest.skip(str(native.UNAVAILABLE_REASON))
    flags, reported = BACKENDS[backend]
    results: list = []
    app = _app(ipc, short_dir, results)
    port = free_port()
    try:
        proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", app.address, *flags)
        assert _server_info(proxy)["io_backends"]["listeners"]["main"] == {
            "ipc": ipc,
            **reported,
            **({"zerocopy_threshold": 16384} if backend == "zerocopy" else {}),
            "ipc_path": {"path": ipc},  # the effective path (differs only for ipc: sockmap)
        }
        for i, (request, reply, when) in enumerate(CASES):
            got = exchange(f"127.0.0.1:{port}", request, reply, when)
            assert got["received"] == (reply, _digest(reply, 2)), (request, reply)
            deadline = time.monotonic() + 10
            while len(results) <= i and time.monotonic() < deadline:
                time.sleep(0.01)
            assert results[i] == (request, _digest(request, 1)), (request, reply)
        assert not app.errors
        stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
        sent_up = sum(r for r, _, _ in CASES) + HEADER_BYTES * len(CASES)
        sent_down = sum(r for _, r, _ in CASES)
        assert stats["bytes"] == {
            "downstream_rx": sent_up,
            "upstream_tx": sent_up,
            "upstream_rx": sent_down,
            "downstream_tx": sent_down,
        }
        assert stats["flags"] == {}
        assert stats["connections_total"] == len(CASES)
        # The app-facing socket's syscalls are the ipc stage, whatever the transport.
        assert stats["stages"]["ipc"]["events"] > 0 and stats["stages"]["ipc"]["ns"] > 0
    finally:
        app.close()


@needs_native
def test_zerocopy_completions_are_accounted_in_stats(start_proxy, short_dir):
    results: list = []
    app = ThreadedServer(app_handler(results))
    port = free_port()
    config = short_dir / "proxy.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: main, address: '127.0.0.1:{port}', upstream: '{app.address}',\n"
        "      write: zerocopy, zerocopy_threshold: 0}\n"
    )
    try:
        proxy = start_proxy("-c", str(config))
        got = exchange(f"127.0.0.1:{port}", 16 * MB, 16 * MB, CONCURRENT)
        assert got["received"] == (16 * MB, _digest(16 * MB, 2))

        def settled(s: dict) -> bool:
            zc = s["zerocopy"]
            return s["connections_active"] == 0 and zc["completed"] == zc["sends"]

        stats = proxy.wait_for(settled, timeout=10)
        zc = stats["zerocopy"]
        # Each direction writes 16 MiB to a TCP socket in <= 64 KiB sends: at least 512 in all.
        assert zc["sends"] >= 2 * 16 * MB // (64 * 1024), zc
        assert zc["completed"] == zc["sends"], zc
        # Loopback delivers into a local socket, which must copy: the kernel says so.
        assert zc["copied"] == zc["completed"], zc
        assert 0 < zc["notifications"] <= zc["completed"], zc
        assert zc["outstanding_bytes"] == 0, zc
        assert zc["fallbacks"] == 0, zc
    finally:
        app.close()


@needs_native
def test_zerocopy_sends_small_messages_by_copy_below_the_threshold(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address, "--write", "zerocopy"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    for _ in range(50):
        sock.sendall(b"x" * 100)
        assert len(sock.recv(100)) > 0
    sock.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
    zc = stats["zerocopy"]
    assert zc["sends"] == 0, zc
    assert zc["plain_sends"] >= 100, zc  # 50 requests + 50 replies, each a copy send


@needs_native
def test_zerocopy_on_plain_asyncio_moves_bytes_and_does_not_spin(start_proxy, echo_server):
    # asyncio's selector maps POLLERR to "readable": unreaped completions would busy-loop.
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address,
        "--write", "zerocopy", "--event-loop", "asyncio",
    )  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = os.urandom(4 * MB)
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(1 << 20)
        assert chunk
        got += chunk
    assert bytes(got) == data
    time.sleep(0.2)
    before = _cpu_seconds(proxy.proc.pid)
    time.sleep(1.0)
    idle_cpu = _cpu_seconds(proxy.proc.pid) - before
    assert idle_cpu < 0.3, f"proxy used {idle_cpu:.2f}s CPU in 1s idle with an open connection"
    sock.close()
    stats = proxy.wait_for(lambda s: s["zerocopy"]["completed"] == s["zerocopy"]["sends"])
    assert stats["zerocopy"]["sends"] > 0


@needs_native
@pytest.mark.parametrize("backend", ["zerocopy", "splice", "copy_libuv", "copy_loop"])
def test_slow_consumer_keeps_memory_bounded_on_native_backends(start_proxy, backend):
    total = 192 * MB
    done = threading.Event()

    server = ThreadedServer(flood_handler(total, done))
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", server.address, *BACKENDS[backend][0]
    )
    baseline = proxy.rss_kib()
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    peak = 0
    for _ in range(40):
        client.recv(64 * 1024)
        time.sleep(0.02)
        peak = max(peak, proxy.rss_kib())
        if backend == "zerocopy":
            lent = proxy.listener()["zerocopy"]["outstanding_bytes"]
            # At most ZC_BUFFERS (4) buffers of 64 KiB lent per direction.
            assert lent <= 2 * 4 * 64 * 1024, lent
    assert not done.is_set(), "upstream finished: the proxy buffered instead of pushing back"
    assert peak - baseline < 16 * 1024, (baseline, peak)
    assert proxy.listener()["bytes"]["upstream_rx"] < 32 * MB
    client.close()
    server.close()


def _disabled_native(monkeypatch) -> None:
    monkeypatch.setenv("PYPROXY_DISABLE_NATIVE", "1")


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (("--write", "zerocopy"), "write"),
        (("--relay", "splice"), "relay"),
        (("--relay-dispatch", "libuv"), "relay_dispatch"),
    ],
)
def test_native_only_config_without_native_is_a_config_error(
    start_proxy, monkeypatch, echo_server, flags, field
):
    _disabled_native(monkeypatch)
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{free_port()}", "--upstream", echo_server.address, *flags,
        ready=False,
    )  # fmt: skip
    assert proxy.proc.wait(15) == 2
    assert f"listeners[0].{field}" in proxy.output
    assert "native module" in proxy.output and "disabled by PYPROXY_DISABLE_NATIVE" in proxy.output


def test_without_native_the_proxy_runs_pure_python_paths_and_says_so(
    start_proxy, monkeypatch, echo_server
):
    _disabled_native(monkeypatch)
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address)
    info = _server_info(proxy)
    assert info["native"] == {"available": False, "reason": "disabled by PYPROXY_DISABLE_NATIVE"}
    assert info["io_backends"]["available"] == {
        "ipc": ["tcp", "uds"],
        "relay": ["userspace-copy"],
        "write": ["send"],
    }
    assert info["io_backends"]["listeners"]["main"]["relay"] == "userspace-copy"
    assert "using pure-Python paths" in proxy.output
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"still relays")
    assert sock.recv(100) == b"still relays"
    sock.close()


@needs_native
@pytest.mark.parametrize(
    ("flags", "warned"),
    [(("--relay-dispatch", "libuv"), True), ((), False)],
    ids=["explicit_libuv_says_so", "default_is_silent"],
)
def test_on_plain_asyncio_the_loop_runs_the_step(start_proxy, echo_server, flags, warned):
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address,
        "--event-loop", "asyncio", *flags,
    )  # fmt: skip
    if not warned:  # auto resolves to the loop here, and /server_info says so
        assert _server_info(proxy)["io_backends"]["listeners"]["main"]["relay_dispatch"] == "loop"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        for i in range(50):
            message = b"%d;" % i
            client.sendall(message)
            got = b""
            while len(got) < len(message):
                got += client.recv(64)
            assert got == message
    proxy.wait_for(lambda s: s["connections_active"] == 0)
    assert ("relay_dispatch libuv: not on uvloop's libuv here" in proxy.output) is warned


# A relay on libuv polls inside a worker's loop, then the loop closes (the worker's last step).
LOOP_CLOSE = """
import asyncio, socket, sys, time, uvloop
from pyproxy.counters import LISTENER_SLOTS
from pyproxy.io import backends
from pyproxy.io.relay import UPSTREAM
from pyproxy.io.relay_step import PolledCopyRelay

loop = uvloop.new_event_loop()
client, down = socket.socketpair()
up, app = socket.socketpair()
for sock in (down, up):
    sock.setblocking(False)
block = memoryview(bytearray(8 * LISTENER_SLOTS)).cast("q")
relay = PolledCopyRelay(loop, down, up, block, timed=True, app_side=UPSTREAM, buffer_size=16384,
                        idle_timeout=0, started_ns=time.perf_counter_ns(), on_close=lambda r: None)
relay.start()
client.sendall(b"ping")
loop.run_until_complete(asyncio.sleep(0.05))
assert app.recv(10) == b"ping" and relay.uv_loop is not None, "not relayed from a libuv poll"
if sys.argv[1] == "release":
    backends.release_native_polls()
loop.close()
print("closed")
"""


@needs_native
@pytest.mark.parametrize("release", [True, False])
def test_a_loop_with_relays_on_libuv_polls_closes_once_they_are_released(release):
    argv = [sys.executable, "-c", LOOP_CLOSE, "release" if release else "keep"]
    if release:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr
    else:  # what the release prevents: an open poll keeps the loop's closing run going
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, text=True, timeout=3)
