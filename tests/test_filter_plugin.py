"""A third-party filter package, pip-installed into the venv, is found through the entry-point group."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, config_refused, filter_yaml, free_port, listener_yaml
from http_peer import HttpUpstream

EXAMPLE = ROOT / "examples" / "header_stamp_filter"


@pytest.fixture
def installed_plugin(tmp_path):
    # Build from a copy so setuptools' build/ and egg-info never land in the repository.
    source = tmp_path / "header_stamp_filter"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        timeout=120,
    )
    yield
    subprocess.run([*pip, "uninstall", "-y", "pyproxy-header-stamp"], check=True, timeout=60)


def test_plugin_entry_point_adds_response_header(installed_plugin, start_proxy, tmp_path):
    upstream = HttpUpstream()
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"""
listeners:
  - name: main
    mode: http
    address: 127.0.0.1:{port}
    upstream: {upstream.address}
    filters:
      - name: stamp
        type: header_stamp
        config: {{header: x-stamped-by, value: plugin-test}}
"""
    )
    proxy = start_proxy("-c", str(config))
    try:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                f"http://127.0.0.1:{port}/hello",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        head = out.stdout.lower()
        assert head.startswith("http/1.1 200"), out
        assert "\nx-stamped-by: plugin-test\n" in head  # text mode folded CRLF
        assert proxy.listener()["filters"]["stamp"]["stamped"] == 1
    finally:
        upstream.close()


def test_plugin_config_errors_name_the_field(installed_plugin, tmp_path):
    filters = filter_yaml("stamp", '{header: "bad header"}', type="header_stamp")
    out = config_refused(tmp_path, listener_yaml(1, "127.0.0.1:2", filters))
    assert "listeners[0].filters[0].config.header" in out.stderr + out.stdout
