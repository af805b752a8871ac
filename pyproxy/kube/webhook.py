"""The mutating admission webhook: AdmissionReview (admission.k8s.io/v1) in over HTTPS, the
injector's changes out as a JSON Patch; bad reviews get an error answer, never a crash."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pyproxy.addresses import parse_address
from pyproxy.kube.injector import InjectError, Target, describe, inject_object
from pyproxy.kube.patch import diff

log = logging.getLogger("pyproxy.webhook")

API_VERSION = "admission.k8s.io/v1"
PATH = "/inject"
MAX_BODY = 3 * 1024 * 1024  # the API server's own limit on an object is about 1.5 MiB
IO_TIMEOUT = 10.0


class BadReview(ValueError):
    """The request is not an AdmissionReview this webhook can answer."""


@dataclass(frozen=True, slots=True)
class Policy:
    target: Target
    fail_closed: bool  # a pod that cannot be injected is denied (else admitted unchanged)


def review(body: bytes, policy: Policy) -> dict:
    """The AdmissionReview answer to one request body; BadReview when there is nothing to answer."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "AdmissionReview":
        raise BadReview("expected an AdmissionReview object")
    if data.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion {data.get('apiVersion')!r}: only {API_VERSION} is served")
    request = data.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("request.uid missing")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    pod = request.get("object")
    if request.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        return answer
    try:
        injected = inject_object(pod, policy.target, "request.object " + describe(pod))
    except InjectError as exc:
        message = str(exc)
        log.warning("cannot inject %s: %s", request["uid"], message)
        if policy.fail_closed:
            response["allowed"] = False
            response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
        else:
            response["warnings"] = [f"pyproxy sidecar not injected: {message}"]
        return answer
    ops = diff(pod, injected)
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return answer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # The TLS handshake happens here, in this connection's thread, bounded by the timeout.
        self.request.settimeout(IO_TIMEOUT)
        self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != PATH:
            self._send(404, b"not found; POST AdmissionReview to /inject\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, b"Content-Length required\n", "text/plain")
            return
        if not 0 <= length <= MAX_BODY:
            self._send(413, b"AdmissionReview too large\n", "text/plain")
            return
        body = self.rfile.read(length)
        try:
            answer = review(body, self.server.policy)
        except BadReview as exc:
            self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")
            return
        except Exception:  # a bug must cost one request, not the webhook
            log.exception("review failed")
            self._send(500, b'{"error": "internal error"}', "application/json")
            return
        self._send(200, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, policy: Policy) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.context, self.policy = context, policy

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, peer = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.info("connection from %s failed: %s", client_address, sys.exc_info()[1])


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level="INFO", format="%(asctime)s pyproxy-webhook %(levelname)s %(message)s"
    )
    try:
        address = parse_address(args.listen)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"pyproxy webhook: {exc}", file=sys.stderr)
        return 2
    policy = Policy(Target(args.kubernetes_version), args.failure_policy == "fail")
    server = _Server((address.host, address.port), context, policy)
    port = server.server_address[1]
    print(f"pyproxy webhook: serving https://{address.host}:{port}{PATH}", flush=True)
    stop = threading.Event()

    def stop_on_signal() -> None:
        stop.wait()
        server.shutdown()  # from another thread: serve_forever returns after its current poll

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=stop_on_signal, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0
