"""Shared test fixtures: a real pyproxy process, free ports, and small real upstream servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from h2_peer import H2Upstream
from http_peer import HttpUpstream
from pyproxy.bench.procs import free_port  # noqa: F401  (tests import it from here)
from servers import ThreadedServer, echo_handler

from pyproxy.counters import LISTENER_SLOTS

ROOT = Path(__file__).resolve().parent.parent


def listener_block() -> memoryview:
    """A zeroed counter block for one listener, laid out as a worker's (pyproxy.counters)."""
    return memoryview(bytearray(8 * LISTENER_SLOTS)).cast("q")


def hold_numbers_below(number: int) -> list[int] | None:
    """Make `number` the lowest free fd number: every free number below it is taken by a
    placeholder (returned; the caller closes them). None if `number` itself is taken.

    A test that wants the kernel's next socket on a given number cannot count on the holes
    below it staying as they are: on an xdist worker the process is shared with the modules run
    before, whose leftover sockets the garbage collector closes whenever it runs, and whose
    threads still winding down close theirs. So the holes are filled first; what is freed after
    that can still win the number, and the test checks which socket got it."""
    held: list[int] = []
    while (spare := os.open(os.devnull, os.O_RDONLY)) < number:
        held.append(spare)
    os.close(spare)
    if spare > number:
        for fd in held:
            os.close(fd)
        return None
    return held


def http_get(
    url: str, method: str = "GET", timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ProxyProcess:
    """`python -m pyproxy run ...` as a child process, with its admin address known."""

    def __init__(
        self, args: list[str], admin_port: int | None = None, cwd: Path | None = None
    ) -> None:
        self.admin_port = admin_port or free_port()
        self.args = [
            sys.executable,
            "-m",
            "pyproxy",
            "run",
            *args,
            "--admin",
            f"127.0.0.1:{self.admin_port}",
        ]
        self.proc = subprocess.Popen(
            self.args, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._output: list[str] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._output.append(line)

    @property
    def output(self) -> str:
        return "".join(self._output)

    def wait_output(self, text: str, timeout: float = 10.0) -> bool:
        """Whether `text` shows in the output within `timeout`: a line the proxy logs reaches
        this process through a pipe and a reader thread, after the answer that it logs."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 15.0) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyproxy exited {self.proc.returncode}:\n{self.output}")
            try:
                status, _ = http_get(self.admin + "/ready", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"pyproxy not ready in {timeout}s:\n{self.output}")

    def stats(self) -> dict:
        status, body = http_get(self.admin + "/stats?format=json")
        assert status == 200, body
        return json.loads(body)

    def listener(self, name: str = "main") -> dict:
        return self.stats()["listeners"][name]

    def wait_for(
        self, predicate: Callable[[dict], bool], name: str = "main", timeout: float = 5.0
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            snap = self.listener(name)
            if predicate(snap) or time.monotonic() > deadline:
                return snap
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pyproxy did not exit after SIGTERM:\n{self.output}") from None

    def rss_kib(self) -> int:
        """Resident memory of the proxy and its workers."""
        total = 0
        pids = [self.proc.pid] + _children(self.proc.pid)
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(*args: str, ready: bool = True) -> ProxyProcess:
        proxy = ProxyProcess(list(args))
        started.append(proxy)
        return proxy.wait_ready() if ready else proxy

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()


def listener_yaml(
    port: int, upstream: str, body: str = "", mode: str = "http", top: str = ""
) -> str:
    """A config file's text: `top` lines, then one listener `main` (mode, 127.0.0.1:port, the
    upstream) followed by `body` lines (indented 4, e.g. `    filters:` ...)."""
    return (
        f"{top}listeners:\n  - name: main\n    mode: {mode}\n    address: 127.0.0.1:{port}\n"
        f"    upstream: {upstream}\n{body}\n"
    )


def filter_yaml(name: str, config: str, type: str = "") -> str:
    """A listener's `filters:` with one filter (its type defaults to its name), for `body`."""
    kind = f"        type: {type}\n" if type else ""
    return f"    filters:\n      - name: {name}\n{kind}        config: {config}\n"


def start_listener(
    start_proxy,
    tmp_path,
    upstream: str,
    body: str = "",
    mode: str = "http",
    top: str = "",
    ready: bool = True,
    port: int | None = None,
):
    """pyproxy from a config file (`listener_yaml`) on `port` or a free one; returns (proxy, port)."""
    port = port or free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(listener_yaml(port, upstream, body, mode, top))
    return start_proxy("-c", str(path), ready=ready), port


def refused(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`pyproxy run ARGS` refuses its config: exit status 2 (its output says why)."""
    result = subprocess.run(
        [sys.executable, "-m", "pyproxy", "run", *args],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result
    return result


def config_refused(tmp_path, text: str) -> subprocess.CompletedProcess:
    """`pyproxy run -c FILE` with this config text refuses it (exit status 2)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return refused("-c", str(path))


def curl(*args: str, max_time: float = 15, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(max_time), *args], capture_output=True, timeout=timeout
    )


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1 response as read (e.g. `curl -i`): status, headers (lower-case names), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def upstream():
    """A real HTTP/1.1 upstream (h11) whose paths are behaviours; see tests/http_peer.py."""
    server = HttpUpstream()
    yield server
    server.close()


@pytest.fixture
def echo_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer(echo_handler)
    yield server
    server.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float | None = None) -> bytes:
    """Exactly `n` bytes (EOF before them fails the test); `timeout` is set on `sock` if given."""
    if timeout is not None:
        sock.settimeout(timeout)
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(n - len(chunks))
        if not data:
            raise AssertionError(f"EOF after {len(chunks)} of {n} bytes")
        chunks += data
    return bytes(chunks)


def require_capability(what: str, ok: bool) -> None:
    """In CI a missing capability is a failure; on a laptop, a skip."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI requires {what}")
    pytest.skip(f"needs {what}")


@pytest.fixture(scope="module")
def require_netns() -> None:
    """Skip without root/netns/iptables; under CI=true a missing capability is a failure."""
    # lazy: pyroute2 loads only for the suites that build network namespaces
    from pyproxy.iptables.netns import missing_capabilities

    missing = missing_capabilities()
    require_capability("network namespaces: " + ", ".join(missing), not missing)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory under /tmp: Unix socket paths are limited to 107 bytes, tmp_path may
    be longer."""
    path = tempfile.mkdtemp(prefix="pp-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def h2_upstream():
    """A real HTTP/2 upstream (h2) whose paths are behaviours; see tests/h2_peer.py."""
    server = H2Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module", params=["native", "h2"])
def h2_codec(request) -> str:
    """The HTTP/2 codec a suite's proxies run (`http2_codec`): every HTTP/2 suite runs on both."""
    if request.param == "native":
        from pyproxy.codec import http2_native

        require_capability("the native HTTP/2 codec (libnghttp2-dev)", http2_native.AVAILABLE)
    return request.param


def _lane_on_hyper_h2(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (
        callspec is not None
        and callspec.params.get("h2_codec") == "h2"
        and "lane-on" in callspec.id
    )


# Modules whose tests change or count what the whole host shares, so that another test running
# beside them would disturb them or be disturbed: idle vCPUs' halt polling (set and restored by
# the validate and sockmap benches), a SCHED_FIFO sidecar (sockmap), the host's list of loaded
# eBPF programs (counted by the eBPF capture test). Marked `host_wide`: `make test` runs the rest
# on parallel workers, then these alone.
HOST_WIDE = frozenset({"test_bench_validate.py", "test_sockmap.py", "test_capture_pods.py"})


@pytest.hookimpl(tryfirst=True)  # marked before `-m` selects by the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The HTTP/2 lane (a module fixture's `lane-on` id) rides the native codec only: its
    pairings with hyper-h2 are left out at collection rather than collected and skipped
    (CI forbids skips). The HOST_WIDE modules' tests are marked `host_wide`."""
    dropped = [item for item in items if _lane_on_hyper_h2(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _lane_on_hyper_h2(item)]
    for item in items:
        if item.path.name in HOST_WIDE:
            item.add_marker(pytest.mark.host_wide)
