"""Build hook for the optional native module: everything else lives in pyproject.toml."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds C extensions but lets the install succeed without them.

    pyproxy runs without pyproxy.native (pure-Python fallback), so a missing
    compiler or header must cost a warning, not the installation.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means "no native module"
            self._warn(exc)

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
    cffi_modules=["native/build_native.py:ffibuilder"],
    # The HTTP/1 head scanner builds Python objects itself, and the native express lane is a
    # Python type called by the event loop: plain C extensions, both on http1_scan.h.
    ext_modules=[
        Extension(
            f"pyproxy.native.{name}",
            [f"native/{source}"],
            depends=["native/http1_scan.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
        for name, source in (("_http1head", "http1_head.c"), ("_express", "express_lane.c"))
    ],
)
