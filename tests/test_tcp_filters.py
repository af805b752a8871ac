"""TCP-mode filters: stream hooks (on_data, on_close) through the plugin door, and connection-time faults."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time

from conftest import ProxyProcess, free_port, recv_exactly, refused

PLUGIN = '''
"""A test plugin: counts the bytes each way and writes them out when the connection closes."""
import json, os
from pyproxy.chain.api import FilterConfigError, FilterFactory, TcpFilter

class Counter(TcpFilter):
    def __init__(self, out):
        self.out, self.up, self.down, self.ends = out, 0, 0, 0
    def on_data(self, data, from_downstream, end_stream):
        if from_downstream:
            self.up += len(data)
        else:
            self.down += len(data)
        self.ends += end_stream
    def on_close(self, flag):
        with open(self.out, "a") as f:
            f.write(json.dumps({"up": self.up, "down": self.down, "ends": self.ends, "flag": flag}) + "\\n")

class CounterFactory(FilterFactory):
    name = "bytecount"
    modes = ("tcp",)
    tcp_filter_class = Counter
    @classmethod
    def validate(cls, config):
        if not isinstance(config.get("out"), str):
            raise FilterConfigError("out", "a file path is required")
        return {"out": config["out"]}
    def create_tcp(self):
        return Counter(self.config["out"])
'''


def _install_plugin(tmp_path) -> str:
    site = tmp_path / "site"
    (site / "bytecount_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "bytecount_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (site / "bytecount_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bytecount-plugin\nVersion: 1.0\n"
    )
    (site / "bytecount_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[pyproxy.filters]\nbytecount = bytecount_plugin:CounterFactory\n"
    )
    return str(site)


def test_stream_hooks_see_every_byte_and_the_close(tmp_path, echo_server, monkeypatch):
    site = _install_plugin(tmp_path)
    out = tmp_path / "counts.jsonl"
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listeners:\n  - name: main\n    address: 127.0.0.1:{port}\n    upstream: {echo_server.address}\n"
        f"    filters:\n      - name: bytecount\n        config: {{out: {out}}}\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    proxy = ProxyProcess(["-c", str(config)]).wait_ready()
    try:
        client = socket.create_connection(("127.0.0.1", port))
        payload = os.urandom(300_000)
        client.sendall(payload)
        assert recv_exactly(client, len(payload)) == payload
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
        client.close()
        deadline = time.monotonic() + 5
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        record = json.loads(out.read_text().splitlines()[0])
        assert record == {"up": len(payload), "down": len(payload), "ends": 2, "flag": ""}
        stage = proxy.listener()["stages"]["filter:bytecount"]
        assert stage["events"] >= 4 and stage["ns"] > 0
    finally:
        proxy.stop()


def test_plugin_config_is_validated_by_the_plugin(tmp_path, monkeypatch):
    site = _install_plugin(tmp_path)
    env = dict(os.environ, PYTHONPATH=site)
    result = refused(
        "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--filter", "bytecount={}", env=env
    )
    assert "filters[0].config.out: a file path is required" in result.stderr


def test_tcp_fault_resets_and_delays_connections(start_proxy, echo_server):
    port = free_port()
    start_proxy(
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        echo_server.address,
        "--filter",
        'fault={"abort":{"http_status":503}}',
    )
    client = socket.create_connection(("127.0.0.1", port))
    try:
        data = client.recv(10)
        assert data == b""
    except ConnectionResetError:
        pass
    port2 = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port2}", "--upstream", echo_server.address, "--filter", 'fault={"delay":{"fixed_delay":"300ms"}}'
    )  # fmt: skip
    started = time.monotonic()
    client = socket.create_connection(("127.0.0.1", port2))
    client.sendall(b"hi")
    assert recv_exactly(client, 2) == b"hi"
    assert time.monotonic() - started >= 0.28
    client.close()
    assert proxy.listener()["filters"]["fault"]["delays_injected"] == 1
