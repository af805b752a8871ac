"""The flags of `pyproxy run` and the config they build: shared by the CLI and the injector,
which validates a sidecar's command line exactly as the sidecar will."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pyproxy.config import (
    ADMIN_DEFAULT,
    HEALTH_DEFAULT,
    MODES,
    PROMETHEUS_DEFAULT,
    ConfigError,
    ProxyConfig,
    build_config,
    load_config,
    sidecar_listeners,
)


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of `pyproxy run`."""
    run.add_argument("-c", "--config", help="YAML config file (SIGHUP reloads it)")
    run.add_argument(
        "--sidecar",
        action="store_true",
        help="capture listeners 15001 (outbound) and 15006 (inbound), admin, metrics and health",
    )
    run.add_argument(
        "--capture-mode",
        choices=("redirect", "tproxy", "ebpf"),
        default="redirect",
        help="how capture rules deliver traffic (tproxy sets IP_TRANSPARENT; ebpf reads the "
        "original destination from the eBPF capture's map)",
    )
    run.add_argument(
        "--allow-root",
        action="store_true",
        help="run capture listeners as root (only if your capture rules exclude uid 0 as well)",
    )
    run.add_argument(
        "--app-socket",
        metavar="unix:/path",
        help="with --sidecar: deliver inbound traffic to the app's Unix socket ({port} allowed)",
    )
    run.add_argument("--mode", choices=MODES, help="protocol mode of the listener(s) (default tcp)")
    run.add_argument("--listen", help="standalone listener address, host:port or unix:/path")
    run.add_argument("--upstream", help="standalone upstream address, host:port or unix:/path")
    run.add_argument(
        "--concurrency", type=int, help="worker processes sharing the listeners (SO_REUSEPORT)"
    )
    run.add_argument(
        "--max-connections", type=int, help="per worker; beyond it new connections are closed"
    )
    run.add_argument(
        "--max-pending-requests", type=int, help="per worker; beyond it requests are answered 503"
    )
    run.add_argument("--admin", help=f"admin address (default {ADMIN_DEFAULT}; 'off' disables)")
    run.add_argument(
        "--prometheus",
        help=f"Prometheus address (sidecar default {PROMETHEUS_DEFAULT}; 'off' disables)",
    )
    run.add_argument(
        "--health", help=f"health address (sidecar default {HEALTH_DEFAULT}; 'off' disables)"
    )
    run.add_argument("--no-stage-clock", action="store_true", help="switch per-stage timing off")
    run.add_argument(
        "--drain-timeout", help="how long SIGTERM waits for in-flight connections (e.g. 5s)"
    )
    run.add_argument("--idle-timeout", help="close connections idle this long (e.g. 1h)")
    run.add_argument("--connect-timeout", help="upstream connect timeout (e.g. 5s)")
    run.add_argument(
        "--buffer-size",
        type=int,
        help="relay buffer per direction per connection, bytes (default 65536)",
    )
    run.add_argument(
        "--write",
        choices=("send", "zerocopy"),
        help="how TCP sockets are written (zerocopy: MSG_ZEROCOPY, needs the native module)",
    )
    run.add_argument(
        "--relay",
        choices=("copy", "splice"),
        help="TCP mode relay (splice: splice(2) through a pipe, needs the native module)",
    )
    run.add_argument(
        "--relay-dispatch",
        choices=("auto", "loop", "libuv"),
        help="TCP mode copy relay: who runs the native step on a readable socket (libuv: "
        "uvloop's libuv calls it in C, no Python per wake-up; loop: the event loop's reader; "
        "auto, the default: libuv on uvloop, else loop)",
    )
    run.add_argument(
        "--upstream-protocol",
        choices=("http1", "http2"),
        help="http mode: how the upstream is spoken to (http2: h2c with prior knowledge)",
    )
    run.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default: uvloop when installed)",
    )
    run.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='add a filter to every listener, in order (repeatable), e.g. --filter \'fault={"abort":{"http_status":503,"percentage":10}}\'',
    )
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the same document a YAML file would hold, then validate it the same way."""
    quick = args.listen or args.upstream or args.sidecar or args.app_socket
    if args.config and quick:
        raise ConfigError(
            "<flags>",
            "--listen/--upstream/--sidecar/--app-socket",
            "cannot be combined with -c; put listeners in the file",
        )
    if args.config:
        with open(args.config, encoding="utf-8"):
            pass  # let load_config report unreadable files with the path
        config = load_config(args.config)
        return _apply_top_flags(config.raw, args, args.config)
    listener_extra: dict[str, Any] = {}
    if args.idle_timeout:
        listener_extra["idle_timeout"] = args.idle_timeout
    if args.connect_timeout:
        listener_extra["connect_timeout"] = args.connect_timeout
    if args.buffer_size:
        listener_extra["buffer_size"] = args.buffer_size
    for backend in ("write", "relay", "relay_dispatch"):
        if getattr(args, backend, None):
            listener_extra[backend] = getattr(args, backend)
    if args.upstream_protocol:
        listener_extra["http"] = {"upstream_protocol": args.upstream_protocol}
    data: dict[str, Any] = {}
    if args.app_socket and not args.sidecar:
        raise ConfigError("<flags>", "--app-socket", "only with --sidecar")
    if args.sidecar:
        data["listeners"] = [
            dict(lst, **listener_extra)
            for lst in sidecar_listeners(args.mode or "tcp", args.capture_mode)
        ]
        for listener in data["listeners"]:
            if args.app_socket and listener["kind"] == "inbound":
                listener["app_socket"] = args.app_socket
        data["prometheus"] = PROMETHEUS_DEFAULT
        data["health"] = HEALTH_DEFAULT
    else:
        if not args.listen or not args.upstream:
            raise ConfigError(
                "<flags>", "--listen/--upstream", "give both (or -c FILE, or --sidecar)"
            )
        data["listeners"] = [
            {
                "name": "main",
                "address": args.listen,
                "upstream": args.upstream,
                "mode": args.mode or "tcp",
                **listener_extra,
            }
        ]
    return _apply_top_flags(data, args, "<flags>")


def _filter_flags(args: argparse.Namespace) -> list[dict]:
    """--filter NAME=JSON, validated by the filter itself so errors name the flag."""
    specs = []
    for i, text in enumerate(args.filter):
        name, sep, raw = text.partition("=")
        where = f"--filter #{i + 1} ({name or text})"
        if not sep or not name:
            raise ConfigError(
                "<flags>", where, 'expected NAME=JSON, e.g. fault={"delay":{"fixed_delay":"10ms"}}'
            )
        try:
            config = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                "<flags>", where, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from None
        specs.append({"name": name, "config": config})
    return specs


def _apply_top_flags(data: dict, args: argparse.Namespace, source: str) -> ProxyConfig:
    data = dict(data)
    flag_filters = _filter_flags(args)
    if flag_filters:
        data["listeners"] = [
            dict(lst, filters=list(lst.get("filters") or []) + flag_filters)
            for lst in data["listeners"]
        ]
    for flag in (
        "admin",
        "prometheus",
        "health",
        "concurrency",
        "max_connections",
        "max_pending_requests",
    ):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.no_stage_clock:
        data["stage_clock"] = False
    if args.allow_root:
        data["allow_root"] = True
    if args.drain_timeout:
        data["drain_timeout"] = args.drain_timeout
    if args.mode and source != "<flags>":
        raise ConfigError("<flags>", "--mode", "set the mode per listener in the config file")
    return build_config(data, source=source)


def run_parser() -> argparse.ArgumentParser:
    """A parser of `pyproxy run`'s arguments alone (what follows `run`)."""
    parser = argparse.ArgumentParser(prog="pyproxy run")
    add_run_arguments(parser)
    return parser
