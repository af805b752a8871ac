"""The main process: starts workers (in-process or forked), serves admin/metrics/health, handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from pyproxy import __version__
from pyproxy.addresses import Address
from pyproxy.admin import EndpointServer, Response
from pyproxy.admin_page import live_page
from pyproxy.config import ConfigError, ListenerMode, ProxyConfig, root_refusal
from pyproxy.counters import W_NOTIFY_COST_NS, W_PID, W_READY, W_TRIMS, CounterStore
from pyproxy.eventloop import event_loop_name, new_event_loop
from pyproxy.io import backends, sockets
from pyproxy.io.fast_path import IpcFastPath
from pyproxy.memory_trim import trim
from pyproxy.native import effective_http2_codec
from pyproxy.worker import Worker

log = logging.getLogger("pyproxy")

PR_SET_PDEATHSIG = 1
_FRAME = struct.Struct("!I")
START_TIMEOUT = 15.0
WATCH_INTERVAL = 0.1  # how often the master looks for dead workers
RESPAWN_BACKOFF = 1.0  # a worker is replaced no sooner than this after it started


def native_status() -> tuple[bool, str]:
    try:
        from pyproxy import native  # type: ignore[attr-defined]  # lazy: cffi loads when asked
    except ImportError as exc:  # pragma: no cover - the package is part of pyproxy
        return False, str(exc)
    available = bool(getattr(native, "AVAILABLE", False))
    return available, "" if available else str(getattr(native, "UNAVAILABLE_REASON", "not built"))


class _ForkedWorker:
    """The master's handle on a worker process: its pid and the control pipe into it."""

    def __init__(self, index: int, pid: int, control_fd: int) -> None:
        self.index, self.pid, self.control_fd = index, pid, control_fd
        self.exited = False
        self.started = time.monotonic()
        self.status = 0  # waitpid's status once exited

    def send(self, *message: object) -> None:
        import pickle  # forked workers only: a single-process proxy never loads it

        payload = pickle.dumps(message)
        try:
            os.write(self.control_fd, _FRAME.pack(len(payload)) + payload)
        except OSError as exc:
            log.warning("worker %d unreachable: %s", self.index, exc)


class Supervisor:
    def __init__(
        self, config: ProxyConfig, reload_config: Callable[[], ProxyConfig] | None = None
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.store = CounterStore(config.concurrency)
        for listener in config.listeners:
            self.store.slot_for(listener.name)
        self.local: Worker | None = None
        self.children: list[_ForkedWorker] = []
        self.started = time.time()
        self.draining = False
        self._shutting_down = False
        self._done: Any = None  # the future _main awaits; set when the loop starts
        self._servers: list[EndpointServer] = []
        self._admin: EndpointServer | None = None
        self.fast_path = IpcFastPath(config)  # installed by run(), before any worker starts

    # ---- process lifecycle -------------------------------------------------

    def run(self) -> int:
        self.fast_path = IpcFastPath.start(self.config)
        try:
            return self._run()
        finally:
            self.fast_path.stop()

    def _run(self) -> int:
        if self.config.concurrency > 1:
            try:
                sockets.share_unix_listeners(_unix_addresses(self.config))
            except OSError as exc:
                print(f"pyproxy: cannot start: {exc}", file=sys.stderr)
                return 1
            for index in range(self.config.concurrency):
                self._fork_worker(index)
        loop = new_event_loop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            backends.release_native_polls()
            loop.close()

    def _fork_worker(self, index: int) -> _ForkedWorker:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            code = 1
            try:
                # A replacement is forked from inside the master's running loop: the child
                # starts its own (what Python 3.12's asyncio does after every fork).
                asyncio._set_running_loop(None)
                signal.set_wakeup_fd(-1)
                code = _worker_process(index, self.store, self.config, self.store.slots(), read_fd)
            finally:
                os._exit(code)
        os.close(read_fd)
        child = _ForkedWorker(index, pid, write_fd)
        self.children.append(child)
        return child

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        try:
            if self.children:
                try:
                    await self._wait_children_ready()
                finally:
                    # Kept while workers run, for their replacements; if none started, nobody
                    # will unlink the paths.
                    if not self.ready():
                        sockets.release_shared_unix(unlink=True)
            else:
                self.local = Worker(0, self.store)
                await self.local.start(self.config, self.store.slots())
            await self._start_endpoints(self.config)
        except (OSError, RuntimeError) as exc:
            print(f"pyproxy: cannot start: {exc}", file=sys.stderr)
            self._kill_children()
            return 1
        for signum, handler in (
            (signal.SIGTERM, self.shutdown),
            (signal.SIGINT, self.shutdown),
            (signal.SIGHUP, self.reload),
        ):
            loop.add_signal_handler(signum, handler)
        self._log_ready()
        trim()  # the start-up's freed scratch, as each worker does (memory_trim.py)
        if not self.children:
            return await self._done
        watcher = loop.create_task(self._watch_children())
        try:
            return await self._done
        finally:
            # Ended here, not left asleep for the loop's close to find pending and log.
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _wait_children_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._reap()
            dead = [child for child in self.children if child.exited]
            if dead:
                raise RuntimeError(
                    f"worker {dead[0].index} exited during start (see its error above)"
                )
            if all(self.store.worker_header(c.index)[W_READY] for c in self.children):
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("workers did not become ready in time")

    def _reap(self) -> None:
        for child in self.children:
            if child.exited:
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid:
                child.exited = True
                child.status = status
                self.store.worker_died(child.index)

    async def _watch_children(self) -> None:
        while not self._done.done():
            self._reap()
            if not self.draining:
                for child in [c for c in self.children if c.exited]:
                    self._replace(child)
            await asyncio.sleep(WATCH_INTERVAL)

    def _replace(self, dead: _ForkedWorker) -> None:
        """Fork a worker with the dead one's index (its counters and slot) on the current config.

        Its connections died with it (their clients saw a reset); the other workers served on
        meanwhile. One that dies young is replaced no sooner than RESPAWN_BACKOFF after it
        started, so a worker that cannot start does not make the master spin.
        """
        if time.monotonic() - dead.started < RESPAWN_BACKOFF:
            return  # the next watch pass looks again
        how = (
            f"signal {os.WTERMSIG(dead.status)}"
            if os.WIFSIGNALED(dead.status)
            else f"exit code {os.waitstatus_to_exitcode(dead.status)}"
        )
        self.children.remove(dead)
        os.close(dead.control_fd)
        child = self._fork_worker(dead.index)
        log.error(
            "worker %d (pid %d) died (%s); replaced by pid %d", dead.index, dead.pid, how, child.pid
        )

    def _kill_children(self) -> None:
        for child in self.children:
            if not child.exited:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                child.exited = True

    def _log_ready(self) -> None:
        native, reason = native_status()
        log.info(
            "pyproxy %s ready: %d worker(s), event loop %s, native module %s",
            __version__,
            self.config.concurrency,
            event_loop_name(),
            "available" if native else f"unavailable ({reason}); using pure-Python paths",
        )
        for listener in self.config.listeners:
            where = ", ".join(map(str, listener.addresses))
            target = f" -> {listener.upstream}" if listener.upstream else f" ({listener.kind})"
            io = backends.describe(listener)
            log.info(
                "listener %s: %s mode on %s%s; I/O: ipc %s, relay %s, write %s",
                listener.name,
                listener.mode,
                where,
                target,
                io["ipc"],
                io["relay"],
                io["write"],
            )

    # ---- drain, stop, reload --------------------------------------------------

    def stop_accepting(self) -> None:
        self.draining = True
        if self.local is not None:
            self.local.stop_accepting()
        for child in self.children:
            child.send("stop_accepting")

    def shutdown(self) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        self.draining = True
        asyncio.get_running_loop().create_task(self._drain_and_exit())

    async def _drain_and_exit(self) -> None:
        timeout = self.config.drain_timeout
        log.info("draining: no new connections; in-flight ones get up to %.1fs", timeout)
        if self.local is not None:
            await self.local.drain(timeout)
        for child in self.children:
            child.send("drain", timeout)
        deadline = time.monotonic() + timeout + 2.0
        while self.children and time.monotonic() < deadline:
            self._reap()
            if all(child.exited for child in self.children):
                break
            await asyncio.sleep(0.02)
        self._kill_children()
        sockets.release_shared_unix(unlink=False)
        for server in self._servers:
            server.close()
        if not self._done.done():
            self._done.set_result(0)

    def reload(self) -> None:
        if self.reload_config is None:
            log.warning("SIGHUP: started without a config file; nothing to reload")
            return
        try:
            new = self.reload_config()
            refusal = root_refusal(new, os.geteuid())
            if refusal:
                raise ConfigError(new.source, "listeners", refusal)
            self._check_bindable(new)
            self._check_shareable(new)
        except ConfigError as exc:
            log.error("reload refused, running config stays: %s", exc)
            return
        except OSError as exc:
            log.error("reload refused, running config stays: cannot bind: %s", exc)
            return
        fixed = {
            f: getattr(self.config, f) for f in ("concurrency", "admin", "prometheus", "health")
        }
        if any(getattr(new, f) != v for f, v in fixed.items()):
            log.warning(
                "reload: concurrency and admin/metrics/health addresses change only on restart"
            )
        new = dataclasses.replace(new, **fixed)
        for listener in new.listeners:
            self.store.slot_for(listener.name)
        if self.local is not None:
            try:
                self.local.apply(new, self.store.slots())
            except OSError as exc:
                log.error("reload refused, running config stays: %s", exc)
                return
        for child in self.children:
            child.send("apply", new, self.store.slots())
        self.config = new
        log.info("reloaded %s: %d listener(s)", new.source, len(new.listeners))

    def _check_shareable(self, new: ProxyConfig) -> None:
        """Forked workers cannot share a Unix socket bound after the fork: that takes a restart."""
        if not self.children:
            return
        added = set(_unix_addresses(new)) - set(_unix_addresses(self.config))
        if added:
            raise ConfigError(
                new.source,
                "listeners",
                f"new unix: address {sorted(map(str, added))[0]} with concurrency > 1 needs a restart",
            )

    def _check_bindable(self, new: ProxyConfig) -> None:
        current = {a for listener in self.config.listeners for a in listener.addresses}
        for listener in new.listeners:
            for address in listener.addresses:
                if address in current or address.is_unix:
                    continue
                sockets.listen(address, transparent=listener.transparent).close()

    # ---- endpoints -----------------------------------------------------------

    def snapshot(self) -> dict:
        from pyproxy import stats  # lazy: on the first scrape, like prometheus_client

        snap = stats.snapshot(self.store, self.config)
        if self._admin is not None:
            snap["admin"] = {"refused_requests": self._admin.refused}
        for lconf in self.config.listeners:
            listener = snap["listeners"].get(lconf.name)
            if listener is not None:
                total = listener["connections_total"]
                listener["ipc_connections"] = self.fast_path.connections(lconf, total)
        return snap

    def ready(self) -> bool:
        workers = range(self.config.concurrency)
        return not self.draining and all(self.store.worker_header(i)[W_READY] for i in workers)

    def server_info(self) -> dict:
        native, reason = native_status()
        return {
            "version": __version__,
            "state": "DRAINING" if self.draining else ("LIVE" if self.ready() else "INITIALIZING"),
            "uptime_seconds": round(time.time() - self.started, 3),
            "concurrency": self.config.concurrency,
            "workers": [
                {
                    "index": i,
                    "pid": self.store.worker_header(i)[W_PID],
                    "ready": bool(self.store.worker_header(i)[W_READY]),
                    "notify_cost_ns": self.store.worker_header(i)[W_NOTIFY_COST_NS],
                    "connections_total": self.store.worker_connections(i),
                    "memory_trims": self.store.worker_header(i)[W_TRIMS],
                }
                for i in range(self.config.concurrency)
            ],
            "event_loop": event_loop_name(),
            # CPython's small-object allocator, or the C library's (memory_trim.py).
            "allocator": os.environ.get("PYTHONMALLOC") or "pymalloc",
            # Per listener; every backend that is not native-only is always available.
            "io_backends": {
                "available": {
                    "ipc": ["tcp", "uds"] + (["sockmap"] if self.fast_path.path else []),
                    "relay": ["userspace-copy"] + (["splice"] if native else []),
                    "write": ["send"] + (["zerocopy"] if native else []),
                },
                "listeners": {
                    lst.name: {**backends.describe(lst), "ipc_path": self.fast_path.describe(lst)}
                    for lst in self.config.listeners
                },
                "sockmap_messages": self.fast_path.messages(),
            },
            "native": {"available": native, "reason": reason or None},
            # Per HTTP/gRPC listener: native (libnghttp2) or h2 (hyper-h2, the fallback).
            "http2_codec": {
                lst.name: effective_http2_codec(lst.http.http2_codec)
                for lst in self.config.listeners
                if lst.mode is not ListenerMode.TCP
            },
            # Per gRPC listener: whether its unary-shaped calls are carried in C (grpc_lane.py).
            "grpc_lane": self._grpc_lanes(),
            "stage_clock": self.config.stage_clock,
        }

    def _grpc_lanes(self) -> dict[str, bool]:
        listeners = [lst for lst in self.config.listeners if lst.mode is ListenerMode.GRPC]
        if not listeners:
            return {}
        from pyproxy.http.grpc_lane import grpc_lane_route  # lazy: hyper-h2, gRPC only
        from pyproxy.http.router import Router, build_clusters  # lazy: with the lane's rule

        clusters = build_clusters(self.config)
        return {
            lst.name: grpc_lane_route(lst, Router(lst, self.config, clusters)) is not None
            for lst in listeners
        }

    def config_dump(self) -> dict:
        def plain(value: object) -> object:
            if isinstance(value, Address):
                return str(value)
            if dataclasses.is_dataclass(value):
                return {
                    f.name: plain(getattr(value, f.name))
                    for f in dataclasses.fields(value)
                    if f.name != "raw"
                }
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            return value

        from pyproxy.redaction import redact  # lazy: hashlib and its patterns, on the first dump

        dump = redact(plain(self.config))
        assert isinstance(dump, dict)
        return dump

    async def _start_endpoints(self, config: ProxyConfig) -> None:
        def ready(_q: dict) -> Response:
            return Response.text("LIVE\n") if self.ready() else Response.text("NOT READY\n", 503)

        def stats_endpoint(query: dict) -> Response:
            snap = self.snapshot()
            if query.get("format") == ["json"]:
                return Response.json(snap)
            from pyproxy.stats import to_text  # lazy: on the first scrape

            return Response.text(to_text(snap))

        def prometheus(_q: dict) -> Response:
            return Response(
                200, _exposition(self.snapshot), "text/plain; version=0.0.4; charset=utf-8"
            )

        def drain_listeners(_q: dict) -> Response:
            self.stop_accepting()
            return Response.text("OK\n")

        def quit_(_q: dict) -> Response:
            asyncio.get_running_loop().call_soon(self.shutdown)
            return Response.text("OK\n")

        def tap(query: dict):
            from pyproxy.filters.tap import admin_endpoint  # lazy: the tap filter owns its records

            return admin_endpoint(self.config, query)

        live = Response(200, live_page(), "text/html; charset=utf-8")
        admin_routes = {
            "/": ("GET", lambda q: live),
            "/ready": ("GET", ready),
            "/stats": ("GET", stats_endpoint),
            "/stats/prometheus": ("GET", prometheus),
            "/config_dump": ("GET", lambda q: Response.json(self.config_dump())),
            "/server_info": ("GET", lambda q: Response.json(self.server_info())),
            "/drain_listeners": ("POST", drain_listeners),
            "/quitquitquit": ("POST", quit_),
            "/tap": ("GET", tap),
        }
        plan: list[tuple[Any, Any]] = [
            (config.admin, admin_routes),
            (
                config.prometheus,
                {"/stats/prometheus": ("GET", prometheus), "/metrics": ("GET", prometheus)},
            ),
            (config.health, {"/healthz/ready": ("GET", ready)}),
        ]
        for address, routes in plan:
            if address is None:
                continue
            guarded = routes is admin_routes
            server = EndpointServer(routes, guarded, _own_host(address))
            await server.start(address)
            self._servers.append(server)
            if guarded:
                self._admin = server


def _own_host(address: Address) -> str:
    """The host a request names when it reaches this address directly (none for a wildcard bind)."""
    if address.is_unix or ipaddress.ip_address(address.host).is_unspecified:
        return ""
    return address.host


def _unix_addresses(config: ProxyConfig) -> list[Address]:
    return [a for listener in config.listeners for a in listener.addresses if a.is_unix]


def _worker_process(
    index: int, store: CounterStore, config: ProxyConfig, slots: dict, control_fd: int
) -> int:
    """Body of a forked worker: its own event loop; obeys the control pipe; drains on SIGTERM too."""
    import ctypes
    import pickle

    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole group; the master decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = Worker(index, store)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    pending = bytearray()

    def on_control() -> None:
        try:
            chunk = os.read(control_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            # The master is gone: drain and leave.
            loop.remove_reader(control_fd)
            loop.create_task(worker.drain(worker.config.drain_timeout if worker.config else 1.0))
            return
        pending.extend(chunk)
        while len(pending) >= 4:
            (size,) = _FRAME.unpack_from(pending)
            if len(pending) < 4 + size:
                break
            message = pickle.loads(bytes(pending[4 : 4 + size]))
            del pending[: 4 + size]
            _obey(message)

    def _obey(message: tuple) -> None:
        kind = message[0]
        if kind == "apply":
            try:
                worker.apply(message[1], message[2])
            except OSError as exc:
                log.error("worker %d: reload not applied: %s", index, exc)
        elif kind == "stop_accepting":
            worker.stop_accepting()
        elif kind == "drain":
            loop.create_task(worker.drain(message[1]))

    async def main() -> int:
        try:
            await worker.start(config, slots)
        except OSError as exc:
            print(f"pyproxy worker {index}: cannot start: {exc}", file=sys.stderr)
            return 1
        loop.add_reader(control_fd, on_control)
        loop.add_signal_handler(
            signal.SIGTERM,
            lambda: loop.create_task(
                worker.drain(worker.config.drain_timeout if worker.config else 1.0)
            ),
        )
        await worker.wait_stopped()
        return 0

    try:
        return loop.run_until_complete(main())
    finally:
        backends.release_native_polls()
        loop.close()


def _exposition(take_snapshot: Callable[[], dict]) -> bytes:
    # lazy: prometheus_client is imported on the first scrape: a worker nobody scrapes never pays.
    from pyproxy.prometheus import exposition

    return exposition(take_snapshot)
