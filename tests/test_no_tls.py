"""`pyproxy run` loads no TLS: asyncio and uvloop come up without the ssl module, so OpenSSL
(libssl, libcrypto: about 4 MiB of an idle worker's RSS) is never mapped, and the proxy
serves as before. Other pyproxy commands and other processes keep ssl as it is."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import free_port, http_get


def _mapped(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_running_proxy_maps_no_openssl_and_serves(start_proxy, upstream, workers):
    port = free_port()
    proxy = start_proxy("--mode", "http", "--listen", f"127.0.0.1:{port}",
                        "--upstream", upstream.address, "--concurrency", workers)  # fmt: skip
    status, _ = http_get(f"http://127.0.0.1:{port}/status/200")
    assert status == 200
    status, _ = http_get(proxy.admin + "/stats")  # what a monitored proxy has loaded
    assert status == 200
    info = proxy.stats()
    assert info is not None
    pids = {proxy.proc.pid} | {w["pid"] for w in _server_info(proxy)["workers"]}
    for pid in pids:
        maps = _mapped(pid)
        assert "libssl" not in maps and "libcrypto" not in maps, pid
        assert "_ssl." not in maps, pid


def test_tcp_mode_relays_without_openssl(start_proxy, echo_server):
    port = free_port()
    proxy = start_proxy("--listen", f"127.0.0.1:{port}", "--upstream", echo_server.address)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
    assert "libcrypto" not in _mapped(proxy.proc.pid)


def test_ssl_stays_importable_after_the_event_loop_loaded_without_it():
    # In the same process, later code that wants TLS gets the real module.
    code = (
        "from pyproxy.no_tls import load_event_loop_without_tls as load\n"
        "import sys\n"
        "assert load() and 'ssl' not in sys.modules\n"
        "import uvloop, asyncio\n"
        "import ssl\n"
        "assert ssl.create_default_context() is not None\n"
        "assert not load()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _server_info(proxy) -> dict:
    import json

    status, body = http_get(proxy.admin + "/server_info")
    assert status == 200, body
    return json.loads(body)
