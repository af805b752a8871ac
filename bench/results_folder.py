"""The one writer of a bench run's results folder: what was measured and how to measure it again.

Every bench (compare and each per-area script) ends with `write_results`, which fills
`out/` with:

* `results.json` — the run's whole result document;
* `results.csv` — its table rows (the bench's own rows, or every number of the result
  with its dotted path when the bench has no row table);
* `table.md` — the markdown report the bench printed;
* `inputs.json` — the command line and every option, so the run can be repeated;
* `environment.json` — the platform (CPU model, kernel, Python, pyproxy) and the git state.

Nothing else in bench/ writes results (tests/test_bench_callers.py checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from pyproxy.bench.model import current_platform
from pyproxy.bench.procs import git_state

RESULTS = Path(__file__).resolve().parent / "results"


def default_out(name: str) -> Path:
    """Where a bench's results folder goes unless --out says otherwise."""
    return RESULTS / name


def inputs_of(args: argparse.Namespace | dict) -> dict:
    """The options a run was given, as JSON, with the command line."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return {k: v for k, v in values.items() if k != "func"} | {"argv": sys.argv}


def environment() -> dict:
    return current_platform() | {"git": git_state()}


def write_results(
    out: Path | str,
    result: dict,
    markdown: str,
    inputs: argparse.Namespace | dict,
    rows: list[dict] | None = None,
) -> Path:
    """Write the results folder (see the module docstring); returns it."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (folder / "inputs.json").write_text(json.dumps(inputs_of(inputs), indent=2, default=str) + "\n")
    (folder / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    (folder / "table.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    with (folder / "results.csv").open("w", newline="") as fh:
        if rows is None:
            writer = csv.writer(fh)
            writer.writerow(["key", "value"])
            writer.writerows(flatten(result))
        else:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            dict_writer = csv.DictWriter(fh, columns, restval="")
            dict_writer.writeheader()
            dict_writer.writerows(rows)
    return folder


def publish(
    out: Path | str | None, result: dict, markdown: str, inputs: argparse.Namespace | dict
) -> None:
    """Print the bench's report and write its results folder (when it has one)."""
    print(markdown)
    if out:
        write_results(out, result, markdown, inputs)
        print(f"\nresults: {out}")


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Every number, string and flag of a result document with its dotted path."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in flatten(v, f"{prefix}{k}.")]
    if isinstance(value, list):
        return [kv for i, v in enumerate(value) for kv in flatten(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), value)]
