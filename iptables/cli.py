"""The `pyproxy capture apply|clean|show` command: options from flags or environment, exit 2 on bad ones."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pyproxy.iptables.capture import CaptureError, apply, clean, show
from pyproxy.iptables.rules import (
    CaptureOptionError,
    CaptureOptions,
    describe,
    options_from_strings,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_OPTIONS = 2

# field -> (flag, environment variable, help); flags win over the environment.
OPTIONS: dict[str, tuple[str, str, str]] = {
    "mode": (
        "--mode",
        "PYPROXY_CAPTURE_MODE",
        "redirect (nat REDIRECT) or tproxy (mangle TPROXY inbound)",
    ),
    "inbound_capture_port": (
        "--inbound-capture-port",
        "PYPROXY_INBOUND_CAPTURE_PORT",
        "inbound listener port (15006)",
    ),
    "outbound_capture_port": (
        "--outbound-capture-port",
        "PYPROXY_OUTBOUND_CAPTURE_PORT",
        "outbound listener port (15001)",
    ),
    "proxy_uid": (
        "--proxy-uid",
        "PYPROXY_PROXY_UID",
        "uid the sidecar runs as, never captured (1337)",
    ),
    "proxy_gid": (
        "--proxy-gid",
        "PYPROXY_PROXY_GID",
        "gid the sidecar runs as, never captured (1337; 'none')",
    ),
    "inbound_ports": (
        "--inbound-ports",
        "PYPROXY_INBOUND_PORTS",
        "inbound ports to capture: '*' (default), list, ''",
    ),
    "exclude_inbound_ports": (
        "--exclude-inbound-ports",
        "PYPROXY_EXCLUDE_INBOUND_PORTS",
        "inbound ports to skip",
    ),
    "outbound_ports": (
        "--outbound-ports",
        "PYPROXY_OUTBOUND_PORTS",
        "outbound ports to capture: '*' (default), list",
    ),
    "exclude_outbound_ports": (
        "--exclude-outbound-ports",
        "PYPROXY_EXCLUDE_OUTBOUND_PORTS",
        "outbound ports to skip",
    ),
    "outbound_cidrs": (
        "--outbound-cidrs",
        "PYPROXY_OUTBOUND_CIDRS",
        "outbound destinations to capture: '*', list",
    ),
    "exclude_outbound_cidrs": (
        "--exclude-outbound-cidrs",
        "PYPROXY_EXCLUDE_OUTBOUND_CIDRS",
        "outbound destinations to skip",
    ),
    "families": (
        "--families",
        "PYPROXY_CAPTURE_FAMILIES",
        "address families: 4,6 (default), 4 or 6",
    ),
    "tproxy_mark": ("--tproxy-mark", "PYPROXY_TPROXY_MARK", "fwmark for TPROXY (0x539)"),
    "tproxy_table": ("--tproxy-table", "PYPROXY_TPROXY_TABLE", "routing table for TPROXY (133)"),
}


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("apply", "clean", "show"), help="what to do")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rules (apply/show) or what clean would remove; change nothing",
    )
    for name, (flag, env, text) in OPTIONS.items():
        parser.add_argument(
            flag, dest=name, default=None, metavar="VALUE", help=f"{text} [env {env}]"
        )
    parser.set_defaults(func=run)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `capture` on an argparse subparsers object; the parsed args carry func=run."""
    parser = subparsers.add_parser(
        "capture",
        help="install, remove or show the iptables traffic capture",
        description="Install (apply), remove (clean) or show the iptables capture in this network namespace.",
    )
    _configure(parser)
    return parser


def collect(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Option text by field, and where each came from (flag or environment variable)."""
    values, sources = {}, {}
    for name, (flag, env, _) in OPTIONS.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name], sources[name] = given, flag
        elif env in environ:
            values[name], sources[name] = environ[env], env
    return values, sources


def options_from(args: argparse.Namespace, environ: Mapping[str, str]) -> CaptureOptions:
    """Validated options, or CaptureOptionError whose message names the flag or variable at fault."""
    values, sources = collect(args, environ)
    try:
        return options_from_strings(values)
    except CaptureOptionError as exc:
        flag, env, _ = OPTIONS.get(exc.option, (exc.option, "", ""))
        where = sources.get(exc.option) or f"{flag} / {env}"
        raise CaptureOptionError(exc.option, f"invalid {where}: {exc.reason}") from None


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Carry out args.action; return the process exit status."""
    environ = os.environ if environ is None else environ
    try:
        opts = options_from(args, environ)
    except CaptureOptionError as exc:
        print(f"pyproxy capture: error: {exc.reason}", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    try:
        if args.action == "apply" or (args.action == "show" and args.dry_run):
            if args.dry_run:
                sys.stdout.write(describe(opts))
                return EXIT_OK
            apply(opts)
            print(
                f"pyproxy capture: applied ({opts.mode}, IPv{' + IPv'.join(map(str, opts.families))})"
            )
        elif args.action == "clean":
            if args.dry_run:
                sys.stdout.write("# clean would remove:\n" + show(opts))
                return EXIT_OK
            for line in clean(opts):
                print(f"pyproxy capture: {line}")
        else:
            sys.stdout.write(show(opts))
    except CaptureError as exc:
        print(f"pyproxy capture: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m pyproxy.iptables.cli apply|clean|show ...`."""
    parser = argparse.ArgumentParser(
        prog="pyproxy capture", description="iptables traffic capture for pyproxy"
    )
    _configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
