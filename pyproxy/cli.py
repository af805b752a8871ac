"""The `pyproxy` command: run, stats, capture, inject, webhook, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pyproxy import __version__
from pyproxy.config import (
    ADMIN_DEFAULT,
    HEALTH_DEFAULT,
    MODES,
    PROMETHEUS_DEFAULT,
    ConfigError,
    ProxyConfig,
    build_config,
    load_config,
    root_refusal,
    sidecar_listeners,
)
from pyproxy.eventloop import ENV as ENV_EVENT_LOOP

EXIT_CONFIG = 2


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="run the proxy", description="Run pyproxy from a config file or quick flags."
    )
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
    run.set_defaults(func=cmd_run)


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
    for backend in ("write", "relay"):
        if getattr(args, backend, None):
            listener_extra[backend] = getattr(args, backend)
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


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s pyproxy[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"pyproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"pyproxy: config error: {args.config}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG

    refusal = root_refusal(config, os.geteuid())
    if refusal:
        print(f"pyproxy: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    if args.event_loop:
        os.environ[ENV_EVENT_LOOP] = args.event_loop  # forked workers inherit it
    from pyproxy.supervisor import Supervisor

    reload_config = (lambda: config_from_args(args)) if args.config else None
    return Supervisor(config, reload_config).run()


def cmd_stats(args: argparse.Namespace) -> int:
    from pyproxy.stats import stage_table

    url = f"http://{args.admin}/stats?format=json"
    try:
        import urllib.error  # `pyproxy stats` only: `run` does not load an HTTP client
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as response:
            snap = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        print(f"pyproxy stats: cannot reach the admin at {args.admin}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(snap, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(stage_table(snap))
    return 0


class _Formatter(argparse.HelpFormatter):
    """argparse's own would import shutil (and zlib, bz2, lzma with it) for the terminal width:
    memory the long-running `run` process would carry for nothing."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:  # fmt: skip
        if width is None:
            try:
                columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(1).columns
            except (ValueError, OSError):
                columns = 80
            width = columns - 2  # argparse's margin
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """Every parser, subcommands' included (argparse makes them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser(with_tools: bool = True) -> argparse.ArgumentParser:
    """Every subcommand; `with_tools=False` leaves out capture and kube (and their imports)."""
    parser = _Parser(
        prog="pyproxy", description="A userspace L7 sidecar proxy that measures itself."
    )
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    stats = sub.add_parser("stats", help="print a running proxy's per-stage breakdown")
    stats.add_argument("--admin", default=ADMIN_DEFAULT, help="admin address of the running proxy")
    stats.add_argument("--json", action="store_true", help="raw JSON instead of the table")
    stats.set_defaults(func=cmd_stats)
    demo = sub.add_parser(
        "demo", help="demo: an echo service, pyproxy in front, traffic, the stage table"
    )
    demo.add_argument("--messages", type=int, default=20000)
    demo.add_argument("--connections", type=int, default=4)
    demo.set_defaults(func=lambda a: __import__("pyproxy.demo", fromlist=["main"]).main(a))
    if not with_tools:
        return parser
    try:
        from pyproxy.iptables import cli as capture_cli
    except ImportError:
        capture_cli = None
    if capture_cli is not None and hasattr(capture_cli, "add_parser"):
        capture_cli.add_parser(sub)
    from pyproxy.kube import cli as kube_cli

    kube_cli.add_parsers(sub)
    from pyproxy.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `run` is the long-lived process: it need not load the capture and kube commands' modules.
    parser = build_parser(with_tools=argv[:1] != ["run"])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
