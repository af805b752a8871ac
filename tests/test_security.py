"""Security hardening through a real pyproxy process: admin mutations, /config_dump redaction,
refusing to run a capture sidecar as root, Unix socket permissions."""

from __future__ import annotations

import pytest
from conftest import ProxyProcess, free_port, http_get

FOREIGN = [
    (
        {"Host": "evil.example:15000"},
        "Host",
    ),  # DNS rebinding: the browser names the attacker's host
    ({"Host": "10.1.2.3"}, "Host"),  # another interface's address, not the admin's
    ({"Origin": "http://evil.example"}, "Origin"),  # a cross-site form or fetch
    ({"Origin": "null"}, "Origin"),  # a sandboxed iframe or file:// page
]


@pytest.fixture(scope="module")
def tcp_proxy():
    proxy = ProxyProcess(["--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:9"])
    yield proxy.wait_ready()
    proxy.stop()


@pytest.mark.parametrize(("headers", "named"), FOREIGN)
@pytest.mark.parametrize("path", ["/quitquitquit", "/drain_listeners"])
def test_admin_mutation_from_a_foreign_host_or_origin_is_refused(tcp_proxy, path, headers, named):
    before = tcp_proxy.stats()["admin"]["refused_mutations"]
    status, body = http_get(tcp_proxy.admin + path, method="POST", headers=headers)
    assert status == 403, body
    assert named.encode() in body
    assert http_get(tcp_proxy.admin + "/ready") == (
        200,
        b"LIVE\n",
    )  # still running, still accepting
    assert tcp_proxy.stats()["admin"]["refused_mutations"] == before + 1
    assert f"admin: refused POST {path}" in tcp_proxy.output
    status, body = http_get(tcp_proxy.admin + "/stats/prometheus")
    assert b"pyproxy_admin_refused_mutations_total" in body


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "localhost:1"},
        {"Host": "[::1]"},
        {"Host": "127.0.0.2"},
        {"Origin": "same"},  # replaced below by the admin's own origin
    ],
)
def test_admin_mutation_from_loopback_or_same_origin_is_served(start_proxy, headers):
    proxy = start_proxy("--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:9")
    if headers.get("Origin") == "same":
        headers = {"Origin": proxy.admin}
    assert http_get(proxy.admin + "/drain_listeners", method="POST", headers=headers)[0] == 200
    assert http_get(proxy.admin + "/ready")[0] == 503  # drained
    assert proxy.stats()["admin"]["refused_mutations"] == 0
