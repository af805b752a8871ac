"""`python -m pyproxy.native.check`: is every native extension built, and if not, what is missing.

The set-up runs it after installing: with ``--strict`` (root with apt, where nothing
should be missing) a missing extension fails the set-up; without, it is a loud
warning naming the missing build tools and the command that installs them.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import sysconfig
from pathlib import Path

# Each extension and what the proxy loses without it.
EXTENSIONS = {
    "_native": "splice relay, MSG_ZEROCOPY sends",
    "_http1head": "the C HTTP/1 head scanner",
    "_express": "the native HTTP/1 express lane",
    "_wasmcall": "the wasm host's calls into wasmtime without ctypes",
    "_bpf": "the libbpf loader of the eBPF data path",
    "_h2": "the native HTTP/2 codec (libnghttp2)",
    "_pools": "the pages of empty pymalloc pools given back after a burst of connections",
}
# BPF programs compiled by clang at set-up (native/*.bpf.c -> *.bpf.o), loaded at run time.
BPF_OBJECTS = {
    "sockmap.bpf.o": "ipc: sockmap",
    "capture.bpf.o": "capture --mode ebpf",
}
DEBIAN_BUILD_PACKAGES = "gcc libc6-dev python3-dev clang libbpf-dev linux-libc-dev libnghttp2-dev"


def missing_extensions() -> dict[str, str]:
    """Extension name -> why it did not load (empty when all are built)."""
    failures = {}
    for name in EXTENSIONS:
        try:
            importlib.import_module(f"pyproxy.native.{name}")
        except ImportError as exc:
            failures[name] = str(exc)
    here = Path(__file__).resolve().parent
    for name in BPF_OBJECTS:
        if not (here / name).exists():
            failures[name] = "not compiled"
    return failures


def missing_build_tools() -> list[str]:
    """What the compile step needs and this machine lacks."""
    missing = []
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        missing.append("a C compiler (gcc)")
    if shutil.which("clang") is None:
        missing.append("clang (for the BPF programs)")
    if not Path("/usr/include/bpf/libbpf.h").exists():
        missing.append("the libbpf headers (libbpf-dev)")
    if not Path("/usr/include/nghttp2/nghttp2.h").exists():
        missing.append("the libnghttp2 headers (libnghttp2-dev)")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        missing.append(f"the Python headers ({include}/Python.h)")
    return missing


def report(failures: dict[str, str]) -> str:
    lines = ["pyproxy: native module NOT built; pyproxy will run its pure-Python paths."]
    for name, reason in failures.items():
        what = EXTENSIONS.get(name) or BPF_OBJECTS[name]
        lines.append(f"  pyproxy.native.{name} ({what}): {reason}")
    tools = missing_build_tools()
    if tools:
        lines.append("  missing on this machine: " + ", ".join(tools))
    lines.append(
        f"  to build it: as root, apt-get install {DEBIAN_BUILD_PACKAGES}; then make clean && make test"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.native.check", description=__doc__)
    parser.add_argument("--strict", action="store_true", help="exit 1 when an extension is missing")
    args = parser.parse_args(argv)
    failures = missing_extensions()
    if not failures:
        built = [*EXTENSIONS.values(), *(f"BPF for {v}" for v in BPF_OBJECTS.values())]
        print("pyproxy: native module built (" + ", ".join(built) + ")")
        return 0
    print(report(failures), file=sys.stderr)
    return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
