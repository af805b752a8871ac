"""A pyproxy sidecar in a bench pod, as an injected pod runs one: its traffic captured, uid 1337."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pyproxy.bench.filter_configs import filter_entry
from pyproxy.iptables.netns import Pod

PROXY_UID = 1337
ADMIN = "127.0.0.1:15000"


def start_captured_sidecar(
    pod: Pod,
    mode: str,
    filters: Sequence[str],
    workdir: Path,
    flags: Sequence[str] = (),
    capture_args: Sequence[str] = (),
) -> int:
    """Capture the pod's traffic (as an init container would: iptables REDIRECT, outbound → 15001,
    inbound → 15006; `capture_args` adds to `pyproxy capture apply`), then start its sidecar as
    1337 with these filters; its pid. The sidecar's output goes to `workdir/sidecar-<role>.log`."""
    pod.run([sys.executable, "-m", "pyproxy", "capture", "apply", *capture_args], timeout=60)
    argv = [sys.executable, "-m", "pyproxy", "run", "--sidecar", "--mode", mode,
            "--admin", ADMIN, "--log-level", "warning", *flags]  # fmt: skip
    for kind in filters:
        entry = filter_entry(kind, workdir, f"{pod.role}-{kind}")
        argv += ["--filter", f"{entry['name']}={json.dumps(entry['config'])}"]
    with open(workdir / f"sidecar-{pod.role}.log", "ab") as log:
        proc = pod.popen(argv, uid=PROXY_UID, stdout=log, stderr=subprocess.STDOUT)
    return proc.pid
