"""Microbenchmark of the HTTP/1 codec backends: µs to relay one small request/response pair.

One relay is what the proxy does per request on a keep-alive connection:
the downstream (server-role) codec parses a ~100-byte GET, the upstream
(client-role) codec serialises it, parses a small 200 response, and the
downstream codec serialises that response; both then start the next cycle.
Also timed alone: parsing the request, parsing the response. Prints JSON.

    python bench/codec_parse.py [--seconds 1.0] [--backends fast,h11]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

from pyproxy.codec.events import END, Body, RequestHead, ResponseHead
from pyproxy.codec.http1 import strip_hop_by_hop
from pyproxy.codec.http1_backend import make_http1_codec

REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
    b"Host: svc.local:8080\r\n"
    b"User-Agent: bench/1.0\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 17\r\n\r\n"
    b'{"id":42,"ok":1}\n'
)


def relay_once(backend: str) -> Callable[[], None]:
    down = make_http1_codec(backend, "server")
    up = make_http1_codec(backend, "client")

    def run() -> None:
        for ev in down.receive_data(REQUEST):
            if type(ev) is RequestHead:
                up.send(RequestHead(ev.method, ev.target, strip_hop_by_hop(ev.headers)))
            elif ev is END:
                up.send(END)
        for ev in up.receive_data(RESPONSE):
            if type(ev) is ResponseHead:
                down.send(ResponseHead(ev.status, ev.reason, strip_hop_by_hop(ev.headers)))
            elif type(ev) is Body:
                down.send(ev)
            elif ev is END:
                down.send(END)
        down.start_next_cycle()
        up.start_next_cycle()

    return run


def parse_request(backend: str) -> Callable[[], None]:
    down = make_http1_codec(backend, "server")
    reply = ResponseHead(204, b"No Content", [])

    def run() -> None:
        down.receive_data(REQUEST)
        # Finishing the cycle is part of parsing the next request.
        down.send(reply)
        down.send(END)
        down.start_next_cycle()

    return run


def parse_response(backend: str) -> Callable[[], None]:
    up = make_http1_codec(backend, "client")
    request = RequestHead(b"GET", b"/", [(b"host", b"svc")])

    def run() -> None:
        up.send(request)
        up.send(END)
        up.receive_data(RESPONSE)
        up.start_next_cycle()

    return run


def measure(fn: Callable[[], None], seconds: float) -> dict[str, float]:
    """Best-of-5 µs per call; each round is bounded by ``seconds / 5``."""
    for _ in range(200):  # warm-up (caches, specialisation)
        fn()
    best = float("inf")
    total_calls = 0
    for _ in range(5):
        calls = 0
        start = time.perf_counter_ns()
        deadline = start + int(seconds / 5 * 1e9)
        now = start
        while now < deadline:
            for _ in range(100):
                fn()
            calls += 100
            now = time.perf_counter_ns()
        best = min(best, (now - start) / calls / 1000)
        total_calls += calls
    return {"us_per_op": round(best, 2), "calls": total_calls}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    ap.add_argument("--backends", default="fast,h11")
    args = ap.parse_args(argv)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for backend in args.backends.split(","):
        results[backend] = {
            "relay": measure(relay_once(backend), args.seconds),
            "parse_request": measure(parse_request(backend), args.seconds),
            "parse_response": measure(parse_response(backend), args.seconds),
        }
    out = {
        "bench": "codec_parse",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "request_bytes": len(REQUEST),
        "response_bytes": len(RESPONSE),
        "results": results,
    }
    if "fast" in results and "h11" in results:
        out["h11_over_fast_relay"] = round(
            results["h11"]["relay"]["us_per_op"] / results["fast"]["relay"]["us_per_op"], 1
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
