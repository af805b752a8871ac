"""Run the fuzz targets under atheris for a bounded time: ``python -m fuzz [--seconds N] [target ...]``.

Each target runs in its own process (libFuzzer exits on the first failure) for an
equal share of the budget, seeded from its regression corpus; new interesting
inputs go to build/fuzz/corpus/<target>, failures to build/fuzz/crashes/. A failure
is reproduced by ``python -m fuzz TARGET --replay FILE`` and, once fixed, kept
as a minimized file in tests/fuzz/corpus/<target>/.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = ROOT / "build" / "fuzz"


def _run_one(name: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument the code under test, then hand control to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["pyproxy", "h11", "h2", "hpack", "hyperframe"]):
        from fuzz.targets import TARGETS
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[name])
    atheris.Fuzz()


def _fuzz(name: str, seconds: int) -> tuple[bool, int, str]:
    """(passed, executions, output tail) of one target's run."""
    corpus = WORK / "corpus" / name
    crashes = WORK / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "corpus" / name
    args = [
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/{name}-",
        "-rss_limit_mb=1024",
        "-timeout=10",
        "-max_len=4096",
        str(corpus),
        *([str(seeds)] if seeds.is_dir() else []),
    ]
    env = dict(
        os.environ, PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz", "--child", name, *args],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
    )
    output = proc.stdout + proc.stderr
    runs = re.findall(r"#(\d+)\s", output)
    done = re.search(r"Done (\d+) runs", output)
    executions = int(done.group(1)) if done else int(runs[-1]) if runs else 0
    return proc.returncode == 0, executions, "\n".join(output.splitlines()[-40:])


def _replay(name: str, files: list[str]) -> None:
    from fuzz.targets import TARGETS

    for file in files:
        print(f"{name} {file}")
        TARGETS[name](Path(file).read_bytes())


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # libFuzzer's own flags follow; argparse must not see them
        _run_one(sys.argv[2], sys.argv[3:])
        return 0
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("FUZZ_SECONDS", "240")),
        help="total budget, shared equally by the targets (env FUZZ_SECONDS; default 240)",
    )
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run one target on files")
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.replay:
        if len(names) != 1:
            parser.error("--replay needs exactly one target")
        _replay(names[0], args.replay)
        return 0
    share = max(1, args.seconds // len(names))
    failed = []
    for name in names:
        t0 = time.monotonic()
        passed, executions, tail = _fuzz(name, share)
        elapsed = time.monotonic() - t0
        print(
            f"{name:22} {'ok    ' if passed else 'FAILED'} {executions:9d} runs  {elapsed:6.0f} s"
        )
        if not passed:
            failed.append(name)
            print(tail)
    if failed:
        print(f"failures in {', '.join(failed)}: inputs in {WORK / 'crashes'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
