"""libbpf through cffi (pyproxy.native._bpf): load compiled BPF objects, pin, attach, read maps.

Everything here runs at start, at scrape time or from `pyproxy capture`; nothing on the data
path. Failures raise BpfError with a plain reason (and the verifier's log when a program was
rejected), so callers can say why the eBPF path is off and keep the TCP/iptables paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "pyproxy"
OBJECT_DIR = Path(__file__).resolve().parent
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


class BpfError(RuntimeError):
    """An eBPF object could not be loaded, pinned, attached or read."""


def _binding() -> tuple[Any, Any]:
    try:
        from ._bpf import ffi, lib  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BpfError(
            f"the libbpf binding (pyproxy.native._bpf) is not built: {exc}; "
            "as root: apt-get install clang libbpf-dev linux-libc-dev, then reinstall"
        ) from None
    return ffi, lib


def unavailable_reason(obj_name: str) -> str | None:
    """None when this host can load native/<obj_name> (binding, object, root), else why not."""
    try:
        _binding()
    except BpfError as exc:
        return str(exc)
    if not (OBJECT_DIR / obj_name).exists():
        return f"{obj_name} was not compiled (clang missing at set-up?)"
    if os.geteuid() != 0:
        return "loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


def prepare(obj_name: str, cgroup: Path, hint: str) -> None:
    """Refuse (BpfError) an object this host cannot load, or a cgroup that is no pod; mount bpffs.

    The root cgroup holds every process on the host; `hint` says where to run instead.
    """
    reason = unavailable_reason(obj_name)
    if reason is not None:
        raise BpfError(reason)
    if cgroup == mount_point("cgroup2"):
        raise BpfError(f"refusing to attach to the root cgroup {cgroup} (the whole host); {hint}")
    ensure_bpffs()


def pin_dir(kind: str, cgroup: Path) -> Path:
    """Where one kind of installation for one cgroup is pinned: <PIN_ROOT>/<kind>-cg<cgroup id>."""
    return PIN_ROOT / f"{kind}-cg{os.stat(cgroup).st_ino}"


def _fail(what: str, code: int) -> BpfError:
    code = abs(code)
    return BpfError(f"{what}: {os.strerror(code)} (errno {code})")


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if it is not mounted (pins need it)."""
    if mount_point("bpf") == BPFFS:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", flags, None) != 0:
        raise _fail(f"mounting bpffs at {BPFFS}", ctypes.get_errno())


def mount_point(fstype: str) -> Path | None:
    """Where a filesystem type is mounted (bpf at /sys/fs/bpf preferred), or None."""
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and parts[2] == fstype:
                found.append(Path(parts[1]))
    if BPFFS in found:
        return BPFFS
    return found[0] if found else None


def own_cgroup() -> Path:
    """This process's cgroup v2 directory (the pod's cgroup when the sidecar runs in it)."""
    root = mount_point("cgroup2")
    if root is None:
        raise BpfError("cgroup v2 is not mounted")
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            if line.startswith("0::"):
                return root / line.strip()[3:].lstrip("/")
    raise BpfError("this process has no cgroup v2 membership")


class LoadedObject:
    """A compiled object loaded into the kernel; programs and maps by name until close()."""

    def __init__(self, obj: str | Path) -> None:
        """obj: a file name in native/ (the compiled programs shipped with pyproxy), or a path."""
        ffi, lib = _binding()
        self._ffi, self._lib = ffi, lib
        path = OBJECT_DIR / obj
        lib.pp_bpf_log_start()
        loaded = lib.bpf_object__open_file(str(path).encode(), ffi.NULL)
        if loaded == ffi.NULL:
            raise _fail(f"opening {path}", ffi.errno) from None
        code = lib.bpf_object__load(loaded)
        if code != 0:
            log = ffi.string(lib.pp_bpf_log()).decode(errors="replace")
            lib.bpf_object__close(loaded)
            raise BpfError(f"loading {path} failed ({os.strerror(abs(code))}); libbpf says:\n{log}")
        self._obj = loaded

    def program_names(self) -> list[str]:
        names, prog = [], self._lib.bpf_object__next_program(self._obj, self._ffi.NULL)
        while prog != self._ffi.NULL:
            names.append(self._ffi.string(self._lib.bpf_program__name(prog)).decode())
            prog = self._lib.bpf_object__next_program(self._obj, prog)
        return names

    def map_names(self) -> list[str]:
        names, found = [], self._lib.bpf_object__next_map(self._obj, self._ffi.NULL)
        while found != self._ffi.NULL:
            name = self._ffi.string(self._lib.bpf_map__name(found)).decode()
            if not name.startswith("."):  # .rodata/.bss: internal to the programs
                names.append(name)
            found = self._lib.bpf_object__next_map(self._obj, found)
        return names

    def program_fd(self, name: str) -> int:
        prog = self._lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == self._ffi.NULL:
            raise BpfError(f"no program {name} in the object")
        return int(self._lib.bpf_program__fd(prog))

    def map_fd(self, name: str) -> int:
        found = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if found == self._ffi.NULL:
            raise BpfError(f"no map {name} in the object")
        return int(self._lib.bpf_map__fd(found))

    def close(self) -> None:
        if self._obj is not None:
            self._lib.bpf_object__close(self._obj)
            self._obj = None


def attach_type(name: str) -> int:
    """An `enum bpf_attach_type` value by name, e.g. BPF_CGROUP_SOCK_OPS."""
    return int(getattr(_binding()[1], name))


def pin(fd: int, path: Path) -> None:
    code = _binding()[1].bpf_obj_pin(fd, str(path).encode())
    if code != 0:
        raise _fail(f"pinning {path}", code)


def open_pinned(path: Path) -> int:
    fd = _binding()[1].bpf_obj_get(str(path).encode())
    if fd < 0:
        raise _fail(f"opening pinned {path}", fd)
    return int(fd)


def attach_to_map(prog_fd: int, map_fd: int, kind: str) -> None:
    """Attach a program to a sockmap/sockhash (it stays attached as long as the map lives)."""
    code = _binding()[1].bpf_prog_attach(prog_fd, map_fd, attach_type(kind), 0)
    if code != 0:
        raise _fail(f"attaching a {kind} program to its map", code)


def link_to_cgroup(prog_fd: int, cgroup: Path, kind: str) -> int:
    """A bpf_link attaching the program to a cgroup v2 directory; returns the link's fd."""
    ffi, lib = _binding()
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = lib.bpf_link_create(prog_fd, cgroup_fd, attach_type(kind), ffi.NULL)
    finally:
        os.close(cgroup_fd)
    if fd < 0:
        raise _fail(f"attaching a {kind} program to cgroup {cgroup}", fd)
    return int(fd)


def map_update(fd: int, key: bytes, value: bytes) -> None:
    code = _binding()[1].bpf_map_update_elem(fd, key, value, 0)
    if code != 0:
        raise _fail("updating a map", code)


def map_delete(fd: int, key: bytes) -> None:
    code = _binding()[1].bpf_map_delete_elem(fd, key)
    if code not in (0, -errno.ENOENT):
        raise _fail("deleting from a map", code)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    ffi, lib = _binding()
    out = ffi.new("char[]", value_size)
    code = lib.bpf_map_lookup_elem(fd, key, out)
    if code == -errno.ENOENT:
        return None
    if code != 0:
        raise _fail("reading a map", code)
    return bytes(ffi.buffer(out, value_size))


def map_keys(fd: int, key_size: int) -> list[bytes]:
    ffi, lib = _binding()
    keys: list[bytes] = []
    current, following = ffi.NULL, ffi.new("char[]", key_size)
    while lib.bpf_map_get_next_key(fd, current, following) == 0:
        keys.append(bytes(ffi.buffer(following, key_size)))
        current = ffi.new("char[]", keys[-1])
    return keys


def possible_cpus() -> int:
    """How many per-CPU slots a PERCPU map value has."""
    return int(_binding()[1].libbpf_num_possible_cpus())


def load_and_pin(
    obj_name: str,
    directory: Path,
    map_attachments: Iterable[tuple[str, str, str]] = (),
    cgroup_links: Iterable[tuple[str, str, str]] = (),
    cgroup: Path | None = None,
) -> None:
    """Load an object and pin every map and program under directory, then attach.

    map_attachments: (program, map, attach type), e.g. an SK_MSG program on its sockhash;
    cgroup_links: (program, attach type, link pin name), attached to cgroup as pinned links,
    the last pinned last so its presence marks a complete installation. On any failure,
    everything pinned so far is removed.
    """
    obj = LoadedObject(obj_name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in obj.map_names():
            pin(obj.map_fd(name), directory / name)
        for name in obj.program_names():
            pin(obj.program_fd(name), directory / name)
        for program, target, kind in map_attachments:
            attach_to_map(obj.program_fd(program), obj.map_fd(target), kind)
        for program, kind, link_name in cgroup_links:
            assert cgroup is not None, "cgroup links need a cgroup"
            link_fd = link_to_cgroup(obj.program_fd(program), cgroup, kind)
            try:
                pin(link_fd, directory / link_name)
            finally:
                os.close(link_fd)
    except BaseException:
        remove_pins(directory)
        raise
    finally:
        obj.close()


def cgroup_pin_dirs(cgroup: Path) -> list[Path]:
    """Every pyproxy pin directory for this cgroup (named <kind>-cg<cgroup id>)."""
    if not PIN_ROOT.is_dir():
        return []
    suffix = f"-cg{os.stat(cgroup).st_ino}"
    return sorted(p for p in PIN_ROOT.iterdir() if p.name.endswith(suffix))


def remove_pins(directory: Path) -> list[str]:
    """Unpin everything under a pin directory (links detach, maps and programs go when unused)."""
    if not directory.exists():
        return []
    removed = sorted(p.name for p in directory.iterdir())
    shutil.rmtree(directory)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # the shared parent goes when the last pod's pins are gone
    return removed
