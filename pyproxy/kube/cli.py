"""The `pyproxy inject`, `pyproxy webhook` and `pyproxy wait-ready` commands."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from pyproxy.durations import parse_duration
from pyproxy.kube.injector import DEFAULT_KUBERNETES, HEALTH_PORT, READY_PATH, InjectError, Target
from pyproxy.kube.injector import parse_version as _parse_version

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _kubernetes_version(text: str) -> str:
    try:
        _parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(sub: Any) -> None:
    inject = sub.add_parser(
        "inject",
        help="add the pyproxy sidecar to the workloads in a Kubernetes manifest",
        description="Read multi-document YAML (-f FILE, or stdin), write it with pyproxy injected "
        "into every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob.",
    )
    inject.add_argument("-f", "--filename", default="-", help="manifest file ('-' = stdin)")
    inject.add_argument("-o", "--output", default="-", help="where to write ('-' = stdout)")
    inject.add_argument(
        "--kubernetes-version",
        type=_kubernetes_version,
        default=DEFAULT_KUBERNETES,
        help=f"the cluster's version: native sidecars from 1.29 (default {DEFAULT_KUBERNETES})",
    )
    inject.set_defaults(func=cmd_inject)

    webhook = sub.add_parser(
        "webhook",
        help="serve the mutating admission webhook that injects pods (HTTPS)",
        description="Serve AdmissionReview (admission.k8s.io/v1) on POST /inject over HTTPS.",
    )
    webhook.add_argument(
        "--listen", default="0.0.0.0:9443", help="host:port (default 0.0.0.0:9443)"
    )
    webhook.add_argument("--cert", required=True, help="PEM certificate (chain) of the service")
    webhook.add_argument("--key", required=True, help="PEM private key")
    webhook.add_argument(
        "--kubernetes-version", type=_kubernetes_version, default=DEFAULT_KUBERNETES
    )
    webhook.add_argument(
        "--failure-policy",
        choices=("fail", "ignore"),
        default="fail",
        help="a pod that cannot be injected is denied (fail) or admitted as is (ignore)",
    )
    webhook.set_defaults(func=cmd_webhook)

    wait = sub.add_parser(
        "wait-ready",
        help="wait until the local sidecar reports ready (a postStart hook)",
    )
    wait.add_argument(
        "--url", default=f"http://127.0.0.1:{HEALTH_PORT}{READY_PATH}", help="readiness URL"
    )
    wait.add_argument("--timeout", type=_duration, default=120.0, help="give up after (e.g. 60s)")
    wait.set_defaults(func=cmd_wait_ready)


def cmd_inject(args: argparse.Namespace) -> int:
    from pyproxy.kube.manifest import inject_text  # lazy: PyYAML only for `inject`

    source = "<stdin>" if args.filename == "-" else args.filename
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"pyproxy inject: {source}: cannot read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        result = inject_text(text, Target(args.kubernetes_version))
    except InjectError as exc:
        print(f"pyproxy inject: {source}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output == "-":
        sys.stdout.write(result)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(result)
    return EXIT_OK


def cmd_webhook(args: argparse.Namespace) -> int:
    from pyproxy.kube.webhook import serve  # lazy: ssl and http.server only for `webhook`

    return serve(args)


def cmd_wait_ready(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(args.url, timeout=1) as response:
                if response.status == 200:
                    return EXIT_OK
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            print(
                f"pyproxy wait-ready: {args.url} not ready after {args.timeout:g}s ({last})",
                file=sys.stderr,
            )
            return EXIT_FAILED
        time.sleep(0.1)
