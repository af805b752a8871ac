"""Build hook for the optional native module and eBPF objects: everything else lives in pyproject.toml."""

import os
import shutil
import subprocess
import sys
import sysconfig
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds C extensions but lets the install succeed without them.

    pyproxy runs without pyproxy.native (pure-Python fallback), so a missing
    compiler or header must cost a warning, not the installation.
    """

    def run(self) -> None:
        try:
            self._write_protocol_facts()
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means "no native module"
            self._warn(exc)
        self._build_bpf_objects()
        self._build_tools()

    @staticmethod
    def _write_protocol_facts() -> None:
        """native/protocol_facts.h, which the HTTP C sources include, from pyproxy/protocol.py and
        pyproxy/counters.py: run from the source tree (the package is not installed yet)."""
        root = os.path.dirname(os.path.abspath(__file__))
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
        )
        subprocess.run(
            [sys.executable, os.path.join(root, "native", "facts_header.py")], check=True, env=env
        )

    def _build_bpf_objects(self) -> None:
        """Compile native/*.bpf.c with clang for the bpf target, next to the extension modules.

        They are loaded at run time by libbpf (pyproxy.native.bpf); without clang the proxy keeps
        its TCP/UDS and iptables paths and says why the eBPF ones are missing.
        """
        clang = shutil.which("clang")
        sources = sorted(glob("native/*.bpf.c"))
        if clang is None:
            self._warn(
                RuntimeError("clang not found"), "eBPF programs (" + ", ".join(sources) + ")"
            )
            return
        out_dir = os.path.dirname(self.get_ext_fullpath("pyproxy.native._bpf"))
        os.makedirs(out_dir, exist_ok=True)
        # <asm/types.h> lives under the multiarch include dir on Debian.
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        for source in sources:
            target = os.path.join(out_dir, os.path.basename(source)[: -len(".c")] + ".o")
            argv = [clang, "-O2", "-g", "-Wall", "-target", "bpf", f"-I/usr/include/{multiarch}"]
            try:
                subprocess.run([*argv, "-c", source, "-o", target], check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                self._warn(exc, source)

    def _build_tools(self) -> None:
        """Compile the bench's native programs (native/echo_rtt.c) next to the extension modules.

        Only the bench runs them, and it says so when one is missing.
        """
        compiler = (sysconfig.get_config_var("CC") or "cc").split()
        out_dir = os.path.dirname(self.get_ext_fullpath("pyproxy.native._native"))
        os.makedirs(out_dir, exist_ok=True)
        for source in ("native/echo_rtt.c",):
            target = os.path.join(out_dir, os.path.basename(source)[: -len(".c")])
            argv = [*compiler, "-O2", "-Wall", "-Wextra", source, "-o", target]
            try:
                subprocess.run(argv, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                self._warn(exc, source)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc: BaseException, name: str = "native extensions") -> None:
        bar = "*" * 72
        print(
            f"\n{bar}\nWARNING: building {name} failed: {exc}\n"
            "pyproxy will run with its pure-Python I/O fallback "
            "(pyproxy.native.AVAILABLE is False).\n"
            f"{bar}\n",
            flush=True,
        )


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=[
        "native/build_native.py:ffibuilder",
        "native/build_native.py:bpf_ffibuilder",
        "native/build_native.py:h2_ffibuilder",
    ],
    # The HTTP/1 head scanner builds Python objects itself, and the native express lane is a
    # Python type called by the event loop: plain C extensions, both on http1_scan.h.
    ext_modules=[
        Extension(
            f"pyproxy.native.{name}",
            [f"native/{source}"],
            depends=["native/http1_scan.h", "native/protocol_facts.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
        for name, source in (("_http1head", "http1_head.c"), ("_express", "express_lane.c"))
    ]
    # The worker's memory trim (it reaches into CPython's small-object allocator) and the wasm
    # host's calls into and out of wasmtime (filters/wasm_runtime.py, without ctypes): plain C
    # extensions of one source each.
    + [
        Extension(
            f"pyproxy.native.{name}",
            [f"native/{source}"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
        for name, source in (("_pools", "pool_pages.c"), ("_wasmcall", "wasm_call.c"))
    ],
)
