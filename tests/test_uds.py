"""Unix-domain-socket IPC through a real proxy: socket files, their lifecycle, outbound and inbound delivery, the ipc stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from byte_streams import UnixServer
from conftest import echo_handler, free_port, http_get, recv_exactly


def _unix_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _echo_once(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def _wait_gone(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not path.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_listen_socket_is_0660_serves_and_is_removed_on_sigterm(
    start_proxy, short_dir, echo_server, workers
):
    path = short_dir / "sidecar.sock"
    proxy = start_proxy(
        "--listen", f"unix:{path}", "--upstream", echo_server.address,
        "--concurrency", str(workers),
    )  # fmt: skip
    mode = os.lstat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    # Every worker shares the one socket: several connections all get served.
    clients = [_unix_connect(path) for _ in range(8)]
    for i, client in enumerate(clients):
        _echo_once(client, b"hello %d" % i)
        client.close()
    assert proxy.stop() == 0
    assert not path.exists(), "socket file left behind after SIGTERM"


def test_stale_socket_is_replaced_but_live_socket_and_regular_file_are_refused(
    start_proxy, short_dir, echo_server
):
    path = short_dir / "sidecar.sock"
    # A stale file: bound by a process that is gone (nobody accepts on it).
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    proxy = start_proxy("--listen", f"unix:{path}", "--upstream", echo_server.address)
    client = _unix_connect(path)
    _echo_once(client, b"replaced the stale file")
    client.close()

    # A second proxy on the same live path must not steal it.
    second = start_proxy("--listen", f"unix:{path}", "--upstream", echo_server.address, ready=False)
    assert second.proc.wait(15) == 1
    assert "in use by a running process" in second.output
    client = _unix_connect(path)
    _echo_once(client, b"first proxy still serves")
    client.close()
    proxy.stop()

    regular = short_dir / "not-a-socket"
    regular.write_text("precious")
    third = start_proxy(
        "--listen", f"unix:{regular}", "--upstream", echo_server.address, ready=False
    )
    assert third.proc.wait(15) == 1
    assert "is not a socket" in third.output
    assert regular.read_text() == "precious"


def test_socket_in_a_world_writable_directory_without_sticky_bit_is_refused(
    start_proxy, short_dir, echo_server
):
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may unlink and re-create entries here
    path = shared / "sidecar.sock"
    proxy = start_proxy("--listen", f"unix:{path}", "--upstream", echo_server.address, ready=False)
    assert proxy.proc.wait(15) == 1
    time.sleep(0.05)
    assert "world-writable without the sticky bit (mode 0777)" in proxy.output, proxy.output
    assert not path.exists()
    shared.chmod(0o1777)  # like /tmp: only an entry's owner may remove it
    proxy = start_proxy("--listen", f"unix:{path}", "--upstream", echo_server.address)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660


def test_reload_that_drops_a_unix_listener_removes_its_file(start_proxy, short_dir, echo_server):
    path = short_dir / "extra.sock"
    config = short_dir / "proxy.yaml"
    main = f"  - {{name: main, address: '127.0.0.1:{free_port()}', upstream: '{echo_server.address}'}}\n"
    config.write_text(
        "listeners:\n"
        + main
        + f"  - {{name: extra, address: 'unix:{path}', upstream: '{echo_server.address}'}}\n"
    )
    proxy = start_proxy("-c", str(config))
    assert path.exists()
    config.write_text("listeners:\n" + main)
    proxy.signal(signal.SIGHUP)
    assert _wait_gone(path), proxy.output
    assert "extra" not in proxy.stats()["listeners"]


def test_outbound_listener_on_unix_relays_to_its_upstream_and_times_uds_as_ipc(
    start_proxy, short_dir, echo_server
):
    path = short_dir / "outbound.sock"
    config = short_dir / "proxy.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: out, kind: outbound, address: 'unix:{path}', upstream: '{echo_server.address}'}}\n"
    )
    proxy = start_proxy("-c", str(config), "--allow-root")  # a capture listener; tests run as root
    status, body = http_get(proxy.admin + "/server_info")
    assert json.loads(body)["io_backends"]["listeners"]["out"]["ipc"] == "uds"
    client = _unix_connect(path)
    for i in range(100):
        _echo_once(client, b"message %03d" % i)
    client.close()
    stats = proxy.wait_for(lambda s: s["connections_active"] == 0, name="out")
    assert stats["flags"] == {}
    assert stats["messages"] == 100
    stages = stats["stages"]
    # The app is downstream here: its accept/recv/send (UDS) are ipc; the TCP upstream is read/write.
    assert stages["ipc"]["events"] >= 2 * 100 + 1
    assert stages["write"]["events"] >= 100 and stages["read"]["events"] >= 100
    assert stages["ipc"]["ns"] > 0


def test_inbound_delivers_to_the_apps_unix_socket_per_port(start_proxy, short_dir):
    # transparent: the accepted socket's local address is the original destination, so a
    # direct connection stands in for a captured one without iptables.
    port = free_port()
    app_path = short_dir / f"app-{port}.sock"
    app = UnixServer(str(app_path), echo_handler)
    config = short_dir / "proxy.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: inbound, kind: inbound, address: '127.0.0.1:{port}', transparent: true,\n"
        f"      app_socket: 'unix:{short_dir}/app-{{port}}.sock'}}\n"
    )
    try:
        proxy = start_proxy("-c", str(config), "--allow-root", ready=False)
        try:
            proxy.wait_ready()
        except AssertionError:
            if "Operation not permitted" in proxy.output:
                pytest.skip("IP_TRANSPARENT needs CAP_NET_ADMIN")
            raise
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        _echo_once(client, b"to the app's socket")
        client.close()
        stats = proxy.wait_for(lambda s: s["connections_active"] == 0, name="inbound")
        assert stats["flags"] == {} and app.connections == 1
        assert stats["stages"]["ipc"]["events"] >= 3  # connect + send + recv on the UDS
    finally:
        app.close()


def test_ipc_uds_with_a_tcp_app_address_is_refused_naming_the_field(start_proxy, short_dir):
    config = short_dir / "proxy.yaml"
    config.write_text(
        "listeners:\n"
        f"  - {{name: main, address: '127.0.0.1:{free_port()}', upstream: '127.0.0.1:9', ipc: uds}}\n"
    )
    proxy = start_proxy("-c", str(config), ready=False)
    assert proxy.proc.wait(15) == 2
    assert "listeners[0].ipc: uds needs the app-facing address to be unix:/path" in proxy.output


def test_uds_app_side_moves_bytes_exactly_with_backpressure(start_proxy, short_dir):
    app = UnixServer(str(short_dir / "app.sock"), echo_handler)
    port = free_port()
    try:
        proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", app.address)
        client = socket.create_connection(("127.0.0.1", port), timeout=20)
        data = os.urandom(32 * 1024 * 1024)
        threading.Thread(target=client.sendall, args=(data,), daemon=True).start()
        assert recv_exactly(client, len(data)) == data
        client.close()
        stats = proxy.wait_for(lambda s: s["connections_active"] == 0)
        assert stats["bytes"]["upstream_tx"] == stats["bytes"]["upstream_rx"] == len(data)
    finally:
        app.close()
