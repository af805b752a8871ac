"""Config validation: every refusal names the field and the reason; flags validate like files."""

from __future__ import annotations

import pytest
from conftest import refused

from pyproxy import native
from pyproxy.addresses import parse_address
from pyproxy.config import ConfigError, ListenerKind, ListenerMode, build_config, load_config
from pyproxy.durations import parse_duration


def test_addresses_parse_ipv4_ipv6_and_unix():
    assert str(parse_address("127.0.0.1:80")) == "127.0.0.1:80"
    assert parse_address("[::1]:443").host == "::1"
    assert parse_address("unix:/run/app.sock").path == "/run/app.sock"
    assert parse_address("localhost:8080").host == "127.0.0.1"


@pytest.mark.parametrize(
    "bad",
    ["", "127.0.0.1", "::1:80", "1.2.3.4:70000", "unix:relative", "example.com:80", "[::1]80"],
)
def test_bad_addresses_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError):
        parse_address(bad)


def test_durations():
    assert parse_duration("250us") == pytest.approx(250e-6)
    assert parse_duration("10ms") == pytest.approx(0.01)
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("2m") == 120
    assert parse_duration(3) == 3.0
    for bad in ("fast", "-1s", True, "10"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _doc(**listener):
    base = {"name": "l", "address": "127.0.0.1:1000", "upstream": "127.0.0.1:2000"}
    base.update(listener)
    return {"listeners": [base]}


def test_valid_config_builds_immutable_objects():
    config = build_config(_doc(idle_timeout="2s", buffer_size=4096))
    listener = config.listeners[0]
    assert (
        listener.idle_timeout == 2.0
        and listener.buffer_size == 4096
        and listener.app_side == "upstream"
    )
    with pytest.raises(AttributeError):
        listener.idle_timeout = 1


def test_buffer_size_defaults_per_backend_copy_16k_zerocopy_64k_splice_1mib():
    assert build_config(_doc()).listeners[0].buffer_size == 16384
    assert build_config(_doc(buffer_size=65536)).listeners[0].buffer_size == 65536
    if not native.AVAILABLE:
        pytest.skip(str(native.UNAVAILABLE_REASON))
    assert build_config(_doc(write="zerocopy")).listeners[0].buffer_size == 65536
    assert build_config(_doc(relay="splice")).listeners[0].buffer_size == 1024 * 1024
    given = build_config(_doc(relay="splice", buffer_size=65536)).listeners[0]
    assert given.buffer_size == 65536  # a size given is the pipe's size


def test_listener_mode_and_kind_are_resolved_once_into_enum_members():
    config = build_config(
        {
            "listeners": [
                {"name": "a", "address": "127.0.0.1:1", "upstream": "127.0.0.1:2"},
                {"name": "b", "kind": "inbound", "mode": "grpc", "address": "127.0.0.1:3"},
            ]
        }
    )
    a, b = config.listeners
    assert a.mode is ListenerMode.TCP and a.kind is ListenerKind.STANDALONE  # the defaults
    assert b.mode is ListenerMode.GRPC and b.kind is ListenerKind.INBOUND
    assert f"{b.mode}/{b.kind}" == "grpc/inbound"  # reports and logs still say the word


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        ({"listeners": []}, "listeners", "non-empty"),
        (_doc(mode="smtp"), "listeners[0].mode", "must be one of tcp, http, grpc, got 'smtp'"),
        (_doc(mode=["http"]), "listeners[0].mode", "must be one of"),
        (_doc(kind="sidecar"), "listeners[0].kind", "must be one of standalone, inbound, outbound"),
        (_doc(address="nowhere"), "listeners[0].address", "host:port"),
        (
            _doc(upstream=None) | {"listeners": [{"name": "l", "address": "127.0.0.1:1"}]},
            "listeners[0].upstream",
            "required",
        ),
        (_doc(idle_timeout="soon"), "listeners[0].idle_timeout", "duration"),
        (_doc(buffer_size=10), "listeners[0].buffer_size", "1024"),
        (_doc(colour="blue"), "listeners[0].colour", "unknown field"),
        (_doc() | {"concurrency": 0}, "concurrency", "1..256"),
        (_doc() | {"max_connections": 0}, "max_connections", "1..1048576"),
        (_doc() | {"max_pending_requests": "many"}, "max_pending_requests", "expected an integer"),
        (_doc() | {"admin": "x"}, "admin", "host:port"),
        (_doc(kind="outbound"), "listeners[0].upstream", "original destination"),
        (
            _doc(mode="grpc", http={"upstream_protocol": "http1"}),
            "listeners[0].http.upstream_protocol",
            "must be one of http2",
        ),
        (_doc(grpc={"max_request_message_bytes": 1}), "listeners[0].grpc", "only for mode grpc"),
        (
            _doc(mode="grpc", grpc={"max_response_message_bytes": -1}),
            "listeners[0].grpc.max_response_message_bytes",
            "0..",
        ),
    ],
)
def test_bad_config_names_field_and_reason(doc, path, reason):
    with pytest.raises(ConfigError) as info:
        build_config(doc, source="test.yaml")
    assert info.value.path == path
    assert reason in info.value.reason
    assert str(info.value).startswith(f"test.yaml: {path}: ")


def test_grpc_mode_speaks_http2_upstream_with_4mib_message_limits():
    listener = build_config(_doc(mode="grpc")).listeners[0]
    assert listener.mode == "grpc" and listener.http.upstream_protocol == "http2"
    assert listener.grpc.max_request_message_bytes == 4 * 1024 * 1024
    assert listener.grpc.max_response_message_bytes == 4 * 1024 * 1024
    doc = _doc(mode="grpc", grpc={"max_request_message_bytes": 100})
    assert build_config(doc).listeners[0].grpc.max_request_message_bytes == 100
    doc = _doc(mode="grpc", routes=[{"cluster": "h1"}]) | {
        "clusters": {"h1": {"endpoints": ["127.0.0.1:1"]}}
    }
    with pytest.raises(ConfigError, match="gRPC needs http2"):
        build_config(doc)


def test_duplicate_listener_names_and_addresses_refused():
    doc = {"listeners": [_doc()["listeners"][0], _doc()["listeners"][0]]}
    with pytest.raises(ConfigError, match="duplicate name"):
        build_config(doc)
    doc["listeners"][1] = dict(doc["listeners"][1], name="other")
    with pytest.raises(ConfigError, match="already used"):
        build_config(doc)


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listeners:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML: line \d+"):
        load_config(str(path))


def test_cli_bad_config_exits_2_naming_file_and_field(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "listeners:\n  - name: main\n    address: 127.0.0.1:1\n    upstream: 127.0.0.1:2\n    idle_timeout: forever\n"
    )
    result = refused("-c", str(path))
    assert f"{path}: listeners[0].idle_timeout: expected a duration" in result.stderr


def test_cli_flags_validate_like_the_file():
    result = refused("--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1")
    assert "listeners[0].address: port must be 0..65535" in result.stderr


def test_http_routes_and_clusters_validate():
    doc = _doc(
        mode="http", routes=[{"match": {"prefix": "/api"}, "cluster": "api", "timeout": "2s"}]
    )
    doc["clusters"] = {"api": {"endpoints": ["127.0.0.1:9000", "127.0.0.1:9001"]}}
    config = build_config(doc)
    assert config.listeners[0].routes[0].cluster == "api"
    assert len(config.clusters[0].endpoints) == 2
    doc["clusters"] = {"other": {"endpoints": ["127.0.0.1:9000"]}}
    with pytest.raises(ConfigError) as info:
        build_config(doc)
    assert info.value.path == "listeners[0].routes[0].cluster"
    bad_prefix = _doc(mode="http", routes=[{"match": {"prefix": "api"}}])
    with pytest.raises(ConfigError, match=r"routes\[0\].match.prefix: a path prefix starts with /"):
        build_config(bad_prefix)
    with pytest.raises(ConfigError, match="only for mode http"):
        build_config(_doc(http={"codec": "h11"}))


def test_http2_codec_is_native_or_h2():
    config = build_config(_doc(mode="grpc", http={"http2_codec": "h2"}))
    assert config.listeners[0].http.http2_codec == "h2"
    assert build_config(_doc(mode="http")).listeners[0].http.http2_codec == "native"
    with pytest.raises(ConfigError) as info:
        build_config(_doc(mode="http", http={"http2_codec": "nghttp2"}))
    assert info.value.path == "listeners[0].http.http2_codec"
