"""The admin `/` page in headless Chromium: the bars and numbers it draws are the ones /stats fed it."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from conftest import free_port, http_get, recv_exactly, require_capability

from pyproxy.admin_page import BAR_HEIGHT, BAR_WIDTH, FILTER_COLOURS, STAGE_COLOURS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--force-device-scale-factor=1", "--virtual-time-budget=4000", *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def busy_proxy(start_proxy, echo_server):
    """A TCP proxy that carried some traffic and is now idle, so its /stats stop changing."""
    port = free_port()
    proxy = start_proxy(
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{echo_server.port}"
    )
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(200):
            sock.sendall(b"x" * 512)
            recv_exactly(sock, 512)
    proxy.wait_for(lambda snap: snap["connections_active"] == 0)
    return proxy


def test_admin_root_serves_a_self_contained_page(busy_proxy):
    status, body = http_get(busy_proxy.admin + "/")
    assert status == 200
    page = body.decode()
    assert "/stats?format=json" in page and "<svg" not in page  # bars are drawn from live data
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets


def test_chromium_draws_each_stage_in_proportion_to_the_stats(busy_proxy, tmp_path):
    require_capability("chromium (Debian package)", CHROMIUM is not None)
    stages = busy_proxy.listener()["stages"]
    total = sum(s["ns"] for s in stages.values())
    assert total > 0
    dom = _chromium("--dump-dom", busy_proxy.admin + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    messages = busy_proxy.listener()["messages"]
    for stage, s in stages.items():
        share = f"{s['ns'] / total * 100:.1f}%"
        per = f"{s['ns'] / messages / 1000:.2f}"
        assert f'data-stage="{stage}"' in dom.stdout
        row = dom.stdout.split(f'data-stage="{stage}"', 1)[1].split("</tr>", 1)[0]
        assert share in row and per in row, (stage, row)

    shot = tmp_path / "page.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=800,600", busy_proxy.admin + "/")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[:, :, :3] * 255).round().astype(int)
    colours = dict(STAGE_COLOURS)
    for i, stage in enumerate(s for s in stages if s.startswith("filter:")):
        colours[stage] = FILTER_COLOURS[i % len(FILTER_COLOURS)]
    masks = {}
    for stage in stages:
        rgb = [int(colours[stage][k : k + 2], 16) for k in (1, 3, 5)]
        masks[stage] = (pixels == rgb).all(axis=2)
    # The bar's rows are the ones filled edge to edge with stage colours (legend keys are not).
    coloured = sum(masks.values())
    bar_rows = coloured.sum(axis=1) >= BAR_WIDTH - 1
    assert bar_rows.sum() == BAR_HEIGHT
    for stage, s in stages.items():
        count = int(masks[stage][bar_rows].sum())
        expected = s["ns"] / total * BAR_WIDTH * BAR_HEIGHT
        assert abs(count - expected) <= BAR_HEIGHT, (stage, count, expected)
