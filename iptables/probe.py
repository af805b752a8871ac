"""Tiny TCP listeners and clients run inside pods to prove where a connection really landed."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence

SO_ORIGINAL_DST = 80  # same value for IPv4 (SOL_IP) and IPv6 (SOL_IPV6, IP6T_SO_ORIGINAL_DST)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
CHUNK = 64 * 1024


def original_destination(conn: socket.socket) -> str | None:
    """host:port conntrack saw before NAT, or None when the connection was not NATed."""
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            return f"[{socket.inet_ntop(socket.AF_INET6, packed)}]:{port}"
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return f"{socket.inet_ntop(socket.AF_INET, packed)}:{port}"
    except OSError:
        return None


def _fmt(sockaddr: tuple) -> str:
    host, port = sockaddr[:2]
    host = host.removeprefix("::ffff:")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listener(host: str, port: int, transparent: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # One socket per family: SO_ORIGINAL_DST must be asked at the level of the real family.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        level, option = (
            (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
            if family == socket.AF_INET6
            else (socket.SOL_IP, IP_TRANSPARENT)
        )
        sock.setsockopt(level, option, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _listeners(hosts: Sequence[str], port: int, transparent: bool) -> selectors.DefaultSelector:
    selector = selectors.DefaultSelector()
    for host in hosts:
        selector.register(_listener(host, port, transparent), selectors.EVENT_READ)
    return selector


def _accepted(selector: selectors.DefaultSelector, deadline: float) -> Iterator[socket.socket]:
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            conn.setblocking(True)
            yield conn


def serve_tag(
    hosts: Sequence[str], port: int, tag: str, transparent: bool, lifetime: float
) -> None:
    """Answer every connection with one JSON line: who we are, who called, where it was headed."""
    selector = _listeners(hosts, port, transparent)
    print("READY", flush=True)
    for conn in _accepted(selector, time.monotonic() + lifetime):
        with conn:
            report = {
                "tag": tag,
                "peer": _fmt(conn.getpeername()),
                "local": _fmt(conn.getsockname()),
                "original_dst": original_destination(conn),
                "uid": os.getuid(),
            }
            conn.sendall(json.dumps(report).encode() + b"\n")


def serve_echo(hosts: Sequence[str], port: int, lifetime: float) -> None:
    """Echo every connection until its EOF, one thread per connection."""
    selector = _listeners(hosts, port, transparent=False)
    print("READY", flush=True)

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    for conn in _accepted(selector, time.monotonic() + lifetime):
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def ask(host: str, port: int, timeout: float, source: str | None = None) -> dict:
    """Connect (from source, if given), read the listener's JSON line; an error is reported, not raised."""
    try:
        with socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        ) as conn:
            line = conn.makefile("rb").readline()
            if not line:
                return {"error": "closed without answer"}
            return json.loads(line)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"pyproxy").digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


def bulk(host: str, port: int, size: int, timeout: float) -> dict:
    """Send size bytes through an echo path, read them back, and check they came back unchanged."""
    payload = _pattern(size)
    received = hashlib.sha256()
    count = 0
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as conn:

        def send() -> None:
            view = memoryview(payload)
            for offset in range(0, size, CHUNK):
                conn.sendall(view[offset : offset + CHUNK])
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while data := conn.recv(CHUNK):
            received.update(data)
            count += len(data)
        sender.join(timeout)
        local = _fmt(conn.getsockname())
    return {
        "sent": size,
        "received": count,
        "intact": count == size and received.digest() == hashlib.sha256(payload).digest(),
        "seconds": round(time.monotonic() - started, 3),
        "local": local,
    }


def pingpong(host: str, port: int, count: int, timeout: float) -> dict:
    """One message at a time through an echo path (sizes 1, 2, ... count bytes): each comes back whole."""
    mismatched = []
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in range(1, count + 1):
            message = _pattern(size + 32)[32:]  # differs from size to size
            conn.sendall(message)
            echoed = b""
            while len(echoed) < size and (data := conn.recv(size - len(echoed))):
                echoed += data
            if echoed != message:
                mismatched.append(size)
        conn.shutdown(socket.SHUT_WR)
        tail = conn.recv(1)
    return {"messages": count, "mismatched": mismatched, "eof_after": tail == b""}


def reset(host: str, port: int, timeout: float) -> dict:
    """Send and read back one message, then abort the connection with a TCP reset."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(b"before the reset")
        echoed = conn.recv(64)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"echoed": echoed.decode()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.iptables.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    tag = sub.add_parser("tag", help="answer each connection with a JSON report")
    tag.add_argument(
        "--host", action="append", help="address to listen on (repeat; default 0.0.0.0 and ::)"
    )
    tag.add_argument("--port", type=int, required=True)
    tag.add_argument("--tag", required=True)
    tag.add_argument("--transparent", action="store_true")
    tag.add_argument("--lifetime", type=float, default=120.0)
    echo = sub.add_parser("echo", help="echo server")
    echo.add_argument(
        "--host", action="append", help="address to listen on (repeat; default 0.0.0.0 and ::)"
    )
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--lifetime", type=float, default=300.0)
    client = sub.add_parser("ask", help="connect to a tag listener and print its report")
    client.add_argument("target_host")
    client.add_argument("port", type=int)
    client.add_argument("--timeout", type=float, default=3.0)
    client.add_argument("--source", help="local address to connect from")
    send = sub.add_parser("bulk", help="push bytes through an echo server and verify them")
    send.add_argument("target_host")
    send.add_argument("port", type=int)
    send.add_argument("--bytes", type=int, default=10 * 1024 * 1024)
    send.add_argument("--timeout", type=float, default=60.0)
    ping = sub.add_parser("pingpong", help="small messages one at a time through an echo server")
    ping.add_argument("target_host")
    ping.add_argument("port", type=int)
    ping.add_argument("--count", type=int, default=200)
    ping.add_argument("--timeout", type=float, default=10.0)
    abort = sub.add_parser("reset", help="one echoed message, then a TCP reset")
    abort.add_argument("target_host")
    abort.add_argument("port", type=int)
    abort.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    hosts = getattr(args, "host", None) or ["0.0.0.0", "::"]
    if args.command == "tag":
        serve_tag(hosts, args.port, args.tag, args.transparent, args.lifetime)
    elif args.command == "echo":
        serve_echo(hosts, args.port, args.lifetime)
    elif args.command == "ask":
        print(json.dumps(ask(args.target_host, args.port, args.timeout, args.source)))
    elif args.command == "pingpong":
        print(json.dumps(pingpong(args.target_host, args.port, args.count, args.timeout)))
    elif args.command == "reset":
        print(json.dumps(reset(args.target_host, args.port, args.timeout)))
    else:
        print(json.dumps(bulk(args.target_host, args.port, args.bytes, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
