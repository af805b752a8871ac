"""A tiny real `tcp_echo` run: both latency instruments through real proxies, no bulk phase."""

from __future__ import annotations

import json
import shutil

import pytest
from pyproxy.bench import tcp_echo
from pyproxy.bench.echo_client import NATIVE_ECHO


@pytest.mark.parametrize("instrument", ["c", "python"])
def test_latency_only_run_measures_every_path(tmp_path, instrument):
    if instrument == "c" and not NATIVE_ECHO.exists():
        pytest.skip(f"{NATIVE_ECHO} not built (no C compiler at set-up)")
    argv = ["--rounds", "2", "--messages", "50", "--bulk-rounds", "0",
            "--instrument", instrument, "--out", str(tmp_path)]  # fmt: skip
    assert tcp_echo.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert "bulk" not in result and "bulk" not in result["foreign_cpus"]
    latency = result["latency"]
    assert {"direct", "pyproxy_copy", "pyproxy_splice", "pyproxy_clock_off"} <= set(latency)
    for name, row in latency.items():
        assert len(row["p50_us_rounds"]) == 2 and row["p50_us"] > 0, name
    # every message the client sent crossed the proxy: the proxy's own count says so
    messages = 2 * (50 + tcp_echo.LATENCY_WARMUP)
    assert result["stages"]["messages"] == messages
    assert latency["pyproxy_copy"]["proxy_cpu_us_per_msg"] > 0
    if shutil.which("nginx"):
        assert latency["pyproxy_copy"]["added_p50_vs_nginx"] is not None
    table = (tmp_path / "table.md").read_text()
    assert tcp_echo.INSTRUMENTS[instrument] in table
