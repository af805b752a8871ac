"""A tiny real `bench compare` run: peers started, measured side by side, skips listed with reasons."""

from __future__ import annotations

import csv
import json
import shutil

from pyproxy.bench.echo_server import dechunk

from pyproxy.cli import main


def test_compare_measures_peers_side_by_side_and_lists_skips(tmp_path, capsys):
    argv = ["bench", "compare", "--protocol", "tcp", "--peers", "pyproxy,nginx,caddy",
            "--rounds", "1", "--seconds", "0.2", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    peers = result["peers"]
    assert {"no proxy", "pyproxy"} <= set(peers)
    for name, row in peers.items():
        assert row["exchanges"] > 0 and row["p50_us"] > 0, name
    assert (
        peers["pyproxy"]["added_p50_us"] == peers["pyproxy"]["p50_us"] - peers["no proxy"]["p50_us"]
    )
    assert peers["pyproxy"]["cpu_us_per_request"] is not None
    # Caddy has no TCP proxy: never dropped silently.
    assert "TCP" in result["skipped"]["caddy"] or "not installed" in result["skipped"]["caddy"]
    if shutil.which("nginx"):
        assert "nginx" in peers and "added_p50_vs_nginx" in peers["pyproxy"]
    else:
        assert "nginx" in result["skipped"]
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert {r[0] for r in rows[1:]} == set(peers) | set(result["skipped"])
    table = (tmp_path / "table.md").read_text()
    assert "| caddy | skipped |" in table and table in capsys.readouterr().out
    assert (tmp_path / "latency_cdf.png").stat().st_size > 1000
    assert json.loads((tmp_path / "inputs.json").read_text())["protocol"] == "tcp"


def test_compare_runs_http2_through_both_codecs(tmp_path):
    """HTTP/2 (h2c both sides) beside the same h2c echo: pyproxy on libnghttp2 and on hyper-h2,
    each exchange's 100-byte body echoed whole (the driver checks it)."""
    argv = ["bench", "compare", "--protocol", "http2", "--peers", "pyproxy,pyproxy hyper-h2",
            "--rounds", "1", "--seconds", "0.2", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["peers"]) == {"no proxy", "pyproxy", "pyproxy hyper-h2"}
    assert not result["skipped"]
    for name, row in result["peers"].items():
        assert row["exchanges"] > 0 and row["p50_us"] > 0, name


def test_compare_refuses_an_unknown_peer(tmp_path, capsys):
    assert main(["bench", "compare", "--peers", "envoy", "--out", str(tmp_path)]) == 2
    assert "envoy" in capsys.readouterr().err


def test_http_echo_upstream_reads_chunked_bodies():
    wire = bytearray(b"HEAD\r\n\r\n4\r\nabcd\r\n2;x=1\r\nef\r\n0\r\n\r\nNEXT")
    assert dechunk(wire, 8) == (b"abcdef", len(wire) - 4)
    assert dechunk(bytearray(b"HEAD\r\n\r\n4\r\nab"), 8) is None
