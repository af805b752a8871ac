"""Runs inside a fresh network namespace as root: REDIRECT rules, a sidecar as uid 1337, clients; prints JSON."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def redirect(tool: str, destination: str, port: int, to_port: int) -> list[str]:
    """A nat OUTPUT rule capturing `destination:port`, except the proxy's own connections (uid 1337)."""
    return [
        tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", destination, "--dport", str(port),
        "-m", "owner", "!", "--uid-owner", "1337", "-j", "REDIRECT", "--to-ports", str(to_port),
    ]  # fmt: skip


RULES = [
    redirect("iptables", "127.0.0.1", 9999, 15001),
    redirect("iptables", "127.0.0.1", 8080, 15006),
    redirect("ip6tables", "::1", 9999, 15001),
]
peers: list[str] = []


def serve(host: str, port: int, prefix: bytes) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)

    def handle(conn: socket.socket, peer) -> None:
        peers.append(peer[0])
        while data := conn.recv(65536):
            conn.sendall(prefix + data)
        conn.close()

    def loop() -> None:
        while True:
            conn, peer = sock.accept()
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while data := sock.recv(65536):
            out += data
        return out


def stats() -> dict:
    with urllib.request.urlopen("http://127.0.0.1:15000/stats?format=json", timeout=5) as r:
        return json.load(r)["listeners"]


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for rule in RULES:
        subprocess.run(rule, check=True)
    serve("127.0.0.1", 9999, b"v4:")
    serve("::1", 9999, b"v6:")
    serve("127.0.0.1", 8080, b"app:")
    proxy = subprocess.Popen(
        [
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            sys.executable,
            "-m",
            "pyproxy",
            "run",
            "--sidecar",
            "--admin",
            "127.0.0.1:15000",
            "--prometheus",
            "off",
            "--health",
            "off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    result: dict = {}
    try:
        for _ in range(200):
            try:
                stats()
                break
            except OSError:
                time.sleep(0.05)
        result["v4"] = roundtrip("127.0.0.1", 9999, b"hello").decode()
        result["v6"] = roundtrip("::1", 9999, b"hello6").decode()
        result["inbound"] = roundtrip("127.0.0.1", 8080, b"in").decode()
        try:
            result["direct"] = roundtrip("127.0.0.1", 15001, b"loop?").decode()
        except OSError as exc:  # closed with our bytes unread: the kernel resets
            if exc.errno not in (errno.ECONNRESET, errno.ENOTCONN):  # (ENOTCONN: reset by shutdown)
                raise
            result["direct"] = "reset"
        time.sleep(0.2)
        result["stats"] = stats()
        result["app_peers"] = peers
    finally:
        proxy.terminate()
        result["proxy_exit"] = proxy.wait(15)
        result["proxy_output"] = proxy.stdout.read()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
