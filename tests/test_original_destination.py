"""Outbound and inbound capture listeners recover the original destination from real REDIRECT rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, require_capability

SCENARIO = Path(__file__).parent / "scenarios" / "original_destination.py"


def test_redirected_connections_reach_their_original_destination_v4_v6_and_inbound():
    require_capability("root", os.geteuid() == 0)
    require_capability(
        "iptables, ip6tables, ip and setpriv",
        all(shutil.which(t) for t in ("iptables", "ip6tables", "ip", "setpriv")),
    )
    namespace = f"pyproxy-od-{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True)
    require_capability(f"ip netns add ({created.stderr.strip()})", created.returncode == 0)
    try:
        # uid 1337 must be able to import pyproxy from the checkout.
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        run = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, str(SCENARIO)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd="/",
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    assert result["v4"] == "v4:hello", result["proxy_output"]
    assert result["v6"] == "v6:hello6", result["proxy_output"]
    assert result["inbound"] == "app:in", result["proxy_output"]
    assert result["direct"] in (
        "",
        "reset",
    )  # connecting to 15001 itself has no original destination: refused, no loop
    outbound, inbound = result["stats"]["outbound"], result["stats"]["inbound"]
    assert outbound["connections_total"] == 3
    assert outbound["flags"] == {"NR": 1}
    assert outbound["bytes"]["downstream_rx"] == len(b"hello") + len(b"hello6")
    assert outbound["bytes"]["downstream_tx"] == len(b"v4:hello") + len(b"v6:hello6")
    assert inbound["connections_total"] == 1 and inbound["bytes"]["upstream_rx"] == len(b"app:in")
    # The inbound delivery came from 127.0.0.6, so capture rules can tell it from the app's own traffic.
    assert "127.0.0.6" in result["app_peers"]
    assert result["proxy_exit"] == 0
