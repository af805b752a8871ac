"""Build and availability of pyproxy.native: optional compile, env switch, clean-clone install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pyproxy import native

REPO = Path(__file__).resolve().parent.parent
PROBE = (
    "import json, pyproxy.native as n; "
    "print(json.dumps([n.__file__, n.AVAILABLE, n.UNAVAILABLE_REASON]))"
)


def probe(
    python: str, cwd: str, env: dict[str, str] | None = None, *flags: str
) -> tuple[str, bool, str | None]:
    out = subprocess.run(
        [python, *flags, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    file, available, reason = json.loads(out.stdout)
    return file, available, reason


@pytest.mark.skipif(
    os.environ.get("PYPROXY_DISABLE_NATIVE", "") not in ("", "0"), reason="disabled on purpose"
)
def test_native_module_is_built_in_this_install() -> None:
    assert native.AVAILABLE, native.UNAVAILABLE_REASON
    assert native.UNAVAILABLE_REASON is None
    assert native.lib.pp_zc_enable(-1) < 0  # a real C call, returning -errno


def test_disable_env_switch_reports_unavailable_with_reason(tmp_path: Path) -> None:
    env = dict(os.environ, PYPROXY_DISABLE_NATIVE="1")
    code = (
        "import pyproxy.native as n\n"
        "from pyproxy.native.zerocopy import ZeroCopySender\n"
        "assert n.lib is None and n.ffi is None\n"
        "for f in (lambda: n.pipe(), lambda: ZeroCopySender(0)):\n"
        "    try:\n"
        "        f()\n"
        "    except RuntimeError as e:\n"
        "        assert 'disabled by PYPROXY_DISABLE_NATIVE' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "print(n.AVAILABLE, n.UNAVAILABLE_REASON)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False disabled by PYPROXY_DISABLE_NATIVE"


def _clone(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", str(REPO), str(src)], check=True, timeout=120)
    return src


@pytest.mark.timeout(300)
def test_failed_compile_still_builds_a_working_package(tmp_path: Path) -> None:
    src = _clone(tmp_path)
    env = dict(os.environ, CC="false", PYPROXY_DISABLE_NATIVE="0")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pure-Python I/O fallback" in out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("pyproxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyproxy/native/zerocopy.py" in names
    assert not [n for n in names if n.endswith(".so")]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: without site, the dev venv's editable finder cannot lend its built module.
    env = dict(env, PYTHONPATH=str(site))
    file, available, reason = probe(sys.executable, str(tmp_path), env, "-S")
    assert file.startswith(str(site))
    assert available is False
    assert "_native" in reason


@pytest.mark.timeout(900)
def test_clean_clone_pip_install_builds_the_module(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    src = _clone(tmp_path)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYPROXY_DISABLE_NATIVE"}
    file, available, reason = probe(str(venv / "bin" / "python"), "/tmp", env)
    assert "site-packages" in file
    assert available is True, reason
