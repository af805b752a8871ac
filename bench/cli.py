"""`pyproxy bench …`: profile the sidecar, predict an application's overhead, compare proxies, report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pyproxy.bench.model import PODS, SETTINGS

    bench = sub.add_parser("bench", help="profile the sidecar, predict an application's overhead")
    verbs = bench.add_subparsers(dest="bench_command", required=True)

    predict = verbs.add_parser(
        "predict",
        help="predict per-hop, end-to-end and CPU overhead for call graphs or traces",
        description="Input: call graphs (YAML/JSON) or traces (Jaeger JSON, OTLP JSON). "
        "Several graphs, or a trace file with several traces, give a distribution.",
    )
    predict.add_argument("graphs", nargs="+", type=Path, help="call graph or trace files")
    predict.add_argument(
        "--profile", required=True, type=Path, help="profile JSON from `bench profile`"
    )
    predict.add_argument(
        "--what-if",
        action="append",
        default=[],
        metavar="STAGE=FACTOR|ipc=BACKEND",
        help="scale a stage (write=0.5) or switch every sidecar's IPC backend (ipc=unix); repeatable",
    )
    predict.add_argument(
        "--services",
        type=Path,
        help="YAML/JSON mapping of service settings (mode, filters, ipc, sidecar) for traces",
    )
    predict.add_argument(
        "--setting",
        choices=SETTINGS,
        default=PODS,
        help="where the sidecars to price run: pods (behind iptables capture, as in a mesh) or "
        "loopback; a profile measured in another setting is refused unless --force",
    )
    predict.add_argument(
        "--force",
        action="store_true",
        help="use a profile from another platform or setting",
    )
    predict.add_argument(
        "--pin",
        action="store_true",
        help="the apps share CPU 0 and the sidecars CPU 1 (as `validate --pin` places them): "
        "price the schedule of their work on the two CPUs",
    )
    predict.add_argument("--json", action="store_true", help="JSON on stdout instead of markdown")
    predict.add_argument(
        "--out", type=Path, help="write predictions (and a CDF plot in batch) here"
    )
    predict.set_defaults(func=cmd_predict)

    profile = verbs.add_parser(
        "profile",
        help="measure each mode, IPC backend and filter against an echo upstream; fit cost models",
    )
    from pyproxy.bench import profile as profiler

    profiler.add_arguments(profile)
    profile.set_defaults(func=stopped_by_sigterm(profiler.run))

    compare = verbs.add_parser(
        "compare", help="no proxy, pyproxy and other proxies side by side in one run"
    )
    from pyproxy.bench import compare as comparer

    comparer.add_arguments(compare)
    compare.set_defaults(func=stopped_by_sigterm(comparer.run))

    validate = verbs.add_parser(
        "validate", help="predicted vs measured overhead of a small multi-service application"
    )
    from pyproxy.bench import validate as validator

    validator.add_arguments(validate)
    validate.set_defaults(func=stopped_by_sigterm(validator.run))

    report = verbs.add_parser(
        "report", help="a self-contained HTML or markdown report of a results folder"
    )
    from pyproxy.bench import report as reporter

    reporter.add_arguments(report)
    report.set_defaults(func=reporter.run)


def stopped_by_sigterm(
    run: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """A long run that `timeout`, a CI job or kill stops with SIGTERM ends as Ctrl-C does:
    its pods and peers torn down, what it measured written (Python's default SIGTERM would
    skip every cleanup and leave namespaces and processes behind)."""

    owner = os.getpid()

    def interrupted(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper (pyroute2's netns child) dies as by default
            os._exit(128 + signum)
        raise KeyboardInterrupt

    def stoppable(args: argparse.Namespace) -> int:
        signal.signal(signal.SIGTERM, interrupted)
        return run(args)

    return stoppable


def cmd_predict(args: argparse.Namespace) -> int:
    from pyproxy.bench.callgraph import GraphError, load_graphs
    from pyproxy.bench.model import (
        PlatformMismatch,
        Profile,
        check_platform,
        check_setting,
        current_platform,
    )
    from pyproxy.bench.predict import WhatIf, WhatIfError, distribution, predict, report
    from pyproxy.bench.schedule import PINNED, UNPLACED

    try:
        profile = Profile.load(args.profile)
        differences = check_platform(profile, current_platform(), args.force)
        if (forced := check_setting(profile, args.setting, args.force)) is not None:
            differences.append(forced)
        graphs = load_graphs(args.graphs, args.services)
        what_ifs = [WhatIf()] + ([WhatIf.parse(args.what_if)] if args.what_if else [])
        placement = PINNED if args.pin else UNPLACED
        runs = {w.label(): [predict(profile, g, w, placement) for g in graphs] for w in what_ifs}
    except (OSError, ValueError, KeyError, PlatformMismatch, GraphError, WhatIfError) as exc:
        print(f"pyproxy bench predict: {exc}", file=sys.stderr)
        return 2
    for difference in differences:
        print(
            f"pyproxy bench predict: warning: forced across platforms or settings: {difference}",
            file=sys.stderr,
        )
    result: dict = {"profile": str(args.profile), "runs": {}}
    for label, predictions in runs.items():
        entry: dict = {"predictions": [p.to_json() for p in predictions]}
        if len(predictions) > 1:
            entry["distribution"] = distribution(predictions)
        result["runs"][label] = entry
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "predictions.json").write_text(json.dumps(result, indent=2) + "\n")
        from pyproxy.bench.plots import overhead_cdf, what_if_bars
        from pyproxy.bench.predict import percentile

        if len(graphs) > 1:
            overhead_cdf(
                {label: [p.overhead_ns / 1000 for p in preds] for label, preds in runs.items()},
                args.out / "overhead_cdf.png",
            )
        if len(runs) > 1:
            what_if_bars(
                {k: percentile([p.overhead_ns / 1000 for p in v], 0.5) for k, v in runs.items()},
                {k: percentile([p.cpu_cores for p in v], 0.5) for k, v in runs.items()},
                args.out / "what_if.png",
            )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    for label, predictions in runs.items():
        if len(predictions) > 1:
            d = result["runs"][label]["distribution"]
            lat, cpu = d["latency_overhead_us"], d["cpu_overhead_cores"]
            print(f"## {label}: {d['graphs']} graphs\n")
            print(
                f"latency overhead µs: p50 {lat['p50']:.1f}, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}, max {lat['max']:.1f}"
            )
            print(
                f"CPU overhead cores: p50 {cpu['p50']:.4f}, p90 {cpu['p90']:.4f}, p99 {cpu['p99']:.4f}"
            )
            print(
                f"critical path moved in {d['critical_path_moved']} graphs; dominant stage: {d['dominant_latency_stage']}\n"
            )
        else:
            print(report(predictions))
    return 0
