"""The `pyproxy` command: run, stats, capture, inject, webhook, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pyproxy import __version__
from pyproxy.config import ADMIN_DEFAULT, ConfigError, root_refusal
from pyproxy.eventloop import ENV as ENV_EVENT_LOOP
from pyproxy.run_flags import add_run_arguments, config_from_args

EXIT_CONFIG = 2


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="run the proxy", description="Run pyproxy from a config file or quick flags."
    )
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)


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
    from pyproxy.supervisor import Supervisor  # lazy: only `run` loads the proxy itself

    reload_config = (lambda: config_from_args(args)) if args.config else None
    return Supervisor(config, reload_config).run()


def cmd_stats(args: argparse.Namespace) -> int:
    from pyproxy.stats import stage_table  # lazy: `pyproxy stats` only

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
        from pyproxy.iptables import cli as capture_cli  # lazy: left out of `run`
    except ImportError:
        capture_cli = None
    if capture_cli is not None and hasattr(capture_cli, "add_parser"):
        capture_cli.add_parser(sub)
    from pyproxy.kube import cli as kube_cli  # lazy: left out of `run`

    kube_cli.add_parsers(sub)
    from pyproxy.bench import cli as bench_cli  # lazy: left out of `run`

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
