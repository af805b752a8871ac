"""Security hardening through a real pyproxy process: admin mutations, /config_dump redaction,
refusing to run a capture sidecar as root, Unix socket permissions."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import ProxyProcess, free_port, http_get, require_capability, start_listener

from pyproxy.config import build_config, load_config, root_refusal
from pyproxy.redaction import is_secret_name, redact

EXAMPLES = Path(__file__).resolve().parent.parent / "filters" / "wasm_examples"

FOREIGN = [
    (
        {"Host": "evil.example:15000"},
        "Host",
    ),  # DNS rebinding: the browser names the attacker's host
    ({"Host": "10.1.2.3"}, "Host"),  # another interface's address, not the admin's
    ({"Origin": "http://evil.example"}, "Origin"),  # a cross-site form or fetch
    ({"Origin": "null"}, "Origin"),  # a sandboxed iframe or file:// page
]


def test_admin_listens_on_loopback_unless_told_otherwise():
    listeners = [{"name": "main", "address": "127.0.0.1:0", "upstream": "127.0.0.1:9"}]
    assert str(build_config({"listeners": listeners}).admin) == "127.0.0.1:15000"


@pytest.fixture(scope="module")
def tcp_proxy():
    proxy = ProxyProcess(["--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:9"])
    yield proxy.wait_ready()
    proxy.stop()


@pytest.mark.parametrize(("headers", "named"), FOREIGN)
@pytest.mark.parametrize("path", ["/quitquitquit", "/drain_listeners"])
def test_admin_mutation_from_a_foreign_host_or_origin_is_refused(tcp_proxy, path, headers, named):
    before = tcp_proxy.stats()["admin"]["refused_requests"]
    status, body = http_get(tcp_proxy.admin + path, method="POST", headers=headers)
    assert status == 403, body
    assert named.encode() in body
    assert http_get(tcp_proxy.admin + "/ready") == (
        200,
        b"LIVE\n",
    )  # still running, still accepting
    assert tcp_proxy.stats()["admin"]["refused_requests"] == before + 1
    assert tcp_proxy.wait_output(f"admin: refused POST {path}"), tcp_proxy.output
    status, body = http_get(tcp_proxy.admin + "/stats/prometheus")
    assert b"pyproxy_admin_refused_requests_total" in body


@pytest.mark.parametrize("path", ["/config_dump", "/tap?listener=main&filter=tap", "/stats"])
def test_admin_read_through_dns_rebinding_is_refused(tcp_proxy, path):
    """A page at evil.example that re-resolves its name to 127.0.0.1 sends Host: evil.example."""
    before = tcp_proxy.stats()["admin"]["refused_requests"]
    status, body = http_get(tcp_proxy.admin + path, headers={"Host": "evil.example:15000"})
    assert status == 403 and b"DNS rebinding" in body
    assert tcp_proxy.stats()["admin"]["refused_requests"] == before + 1
    # By address (any interface's, e.g. a scrape of the pod IP) it is served.
    assert http_get(tcp_proxy.admin + "/stats", headers={"Host": "10.1.2.3:15000"})[0] == 200


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
    assert proxy.stats()["admin"]["refused_requests"] == 0


LUA_CODE = """-- SECRET-LUA: an API key the script carries
function envoy_on_request(handle) handle:headers():add("x-k", "SECRET-LUA") end
"""


def test_config_dump_hides_inline_code_plugin_configuration_and_secret_header_matches(
    start_proxy, tmp_path
):
    pytest.importorskip("wasmtime")
    wat = (EXAMPLES / "noop.wat").read_text() + ";; SECRET-WAT\n"
    (tmp_path / "filter.lua").write_text(LUA_CODE)
    filters = f"""    filters:
      - name: script
        type: lua
        config:
          inline_code: {json.dumps(LUA_CODE)}
      - name: from_file
        type: lua
        config: {{source_file: {tmp_path / "filter.lua"}}}
      - name: plugin
        type: wasm
        config:
          code_wat: {json.dumps(wat)}
          configuration: {{value: "SECRET-WASM"}}
          vm_config: {{configuration: '{{"password": "SECRET-VM"}}'}}
      - name: tap
        config:
          path: {tmp_path / "tap.jsonl"}
          match:
            headers:
              - {{name: Authorization, exact: "Bearer SECRET-TAP"}}
              - {{name: x-tenant, exact: visible-tenant}}
"""
    proxy, _ = start_listener(start_proxy, tmp_path, "127.0.0.1:9", filters)
    status, body = http_get(proxy.admin + "/config_dump")
    assert status == 200
    assert b"SECRET" not in body, body.decode()
    dump = json.loads(body)
    chain = {spec["name"]: spec["config"] for spec in dump["listeners"][0]["filters"]}
    digest = hashlib.sha256(LUA_CODE.encode()).hexdigest()[:12]
    expected = f"[redacted: {len(LUA_CODE)} chars, sha256:{digest}]"
    assert chain["script"]["code"] == expected
    assert chain["from_file"]["code"] == expected  # the file's content, read at load, too
    assert chain["script"]["max_instructions"] == 1_000_000  # the rest stays readable
    assert chain["plugin"]["configuration"].startswith("[redacted: 11 chars, sha256:")
    assert chain["plugin"]["vm_configuration"].startswith("[redacted: ")
    assert chain["plugin"]["call_time_limit"] > 0
    assert chain["tap"]["match"]["headers"] == [
        {"name": "authorization", "exact": "[redacted]"},
        {"name": "x-tenant", "exact": "visible-tenant"},
    ]


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("client_secret", True),
        ("x-api-key", True),
        ("Authorization", True),
        ("auth.token", True),
        ("token_bucket", False),
        ("max_tokens", False),
        ("keepalive", False),
        ("path_prefix", False),
        ("private_key", True),
        ("key", False),  # the rate limit's descriptor key names a header, not a secret
    ],
)
def test_secret_like_names_are_matched_by_their_last_word(name, secret):
    assert is_secret_name(name) is secret
    dump = redact({name: {"value": "hunter2", "nested": [1, "x"], "enabled": True}})
    hidden = {"value": "[redacted]", "nested": ["[redacted]", "[redacted]"], "enabled": True}
    assert dump == {
        name: hidden if secret else {"value": "hunter2", "nested": [1, "x"], "enabled": True}
    }


def _capture_config(tmp_path, extra: str = "") -> str:
    """An outbound capture listener on a free port (its upstream is each connection's original
    destination), as the sidecar has on 15001."""
    path = tmp_path / "capture.yaml"
    path.write_text(
        f"{extra}listeners:\n  - {{name: out, kind: outbound, address: '127.0.0.1:{free_port()}'}}\n"
    )
    return str(path)


def test_capture_listeners_as_root_are_refused_with_the_reason(start_proxy, tmp_path):
    require_capability("root (uid 0)", os.geteuid() == 0)
    proxy = start_proxy("-c", _capture_config(tmp_path), ready=False)
    assert proxy.proc.wait(15) == 2
    time.sleep(0.05)  # the reader thread collects the last lines
    assert "refusing to run the sidecar as root (uid 0)" in proxy.output, proxy.output
    assert "exclude only the proxy's uid" in proxy.output
    assert "--allow-root" in proxy.output
    # Told to, it runs: by flag or by config field.
    start_proxy("-c", _capture_config(tmp_path), "--allow-root")
    start_proxy("-c", _capture_config(tmp_path, "allow_root: true\n"))


def test_root_rule_spares_other_uids_and_standalone_listeners(tmp_path):
    capture = load_config(_capture_config(tmp_path))
    assert root_refusal(capture, 1337) == ""
    assert root_refusal(capture, 0) != ""
    standalone = build_config(
        {"listeners": [{"name": "main", "address": "127.0.0.1:0", "upstream": "127.0.0.1:9"}]}
    )
    assert root_refusal(standalone, 0) == ""  # `pyproxy run --listen`, `pyproxy demo` as root


def test_reload_adding_capture_listeners_as_root_is_refused(start_proxy, tmp_path):
    require_capability("root (uid 0)", os.geteuid() == 0)
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"listeners:\n  - {{name: main, address: '127.0.0.1:{free_port()}', upstream: '127.0.0.1:9'}}\n"
    )
    proxy = start_proxy("-c", str(path))
    path.write_text(Path(_capture_config(tmp_path)).read_text())
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload refused" not in proxy.output and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "reload refused" in proxy.output and "as root (uid 0)" in proxy.output
    assert list(proxy.stats()["listeners"]) == ["main"]
