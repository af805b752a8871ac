"""`pyproxy webhook`: real AdmissionReviews over TLS (a client trusting only the test CA); the
patch applied to the pod equals `pyproxy inject`'s output; bad reviews get errors, not a crash."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonpatch
import pytest
import yaml
from conftest import ROOT, free_port, require_capability
from test_kube_inject import inject

VERSION = "1.27"
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "web-7d9f-",
        "namespace": "shop",
        "labels": {"app": "web"},
        "annotations": {"sidecar.pyproxy.io/mode": "http", "team/owner": "a~b"},
    },
    "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]},
}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA and a server certificate for localhost / 127.0.0.1, signed by it."""
    require_capability("openssl", shutil.which("openssl") is not None)
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=pyproxy test CA", cwd=d)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
            "-subj", "/CN=pyproxy-webhook.pyproxy-system.svc", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "tls.crt", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


class Webhook:
    def __init__(self, certs: Path, policy: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyproxy", "webhook", "--listen", f"127.0.0.1:{self.port}",
             "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key"),
             "--kubernetes-version", VERSION, "--failure-policy", policy],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert "serving https://" in line, self.proc.stderr.read()  # type: ignore[union-attr]
        self.context = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def post(self, body: bytes, path: str = "/inject") -> tuple[int, bytes]:
        request = urllib.request.Request(
            f"https://127.0.0.1:{self.port}{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def admit(self, pod: dict, operation: str = "CREATE") -> dict:
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "object": pod,
            },
        }
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["response"]["uid"] == review["request"]["uid"]
        return answer["response"]

    def alive(self) -> bool:
        return self.proc.poll() is None and self.post(b"{}", "/inject")[0] == 400


@pytest.fixture
def webhook(certs) -> Iterator[Webhook]:
    hook = Webhook(certs, "fail")
    yield hook
    hook.proc.terminate()
    assert hook.proc.wait(timeout=10) == 0


def inject_cli(pod: dict) -> dict:
    result = inject("--kubernetes-version", VERSION, stdin=yaml.safe_dump(pod))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_webhook_patch_gives_exactly_what_inject_gives(webhook):
    response = webhook.admit(POD)
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(POD, patch)
    assert patched == inject_cli(POD)
    assert [c["name"] for c in patched["spec"]["containers"]] == ["pyproxy", "web"]


def test_opted_out_pods_and_other_operations_are_admitted_unchanged(webhook):
    opted_out = json.loads(json.dumps(POD))
    opted_out["metadata"]["annotations"]["sidecar.pyproxy.io/inject"] = "false"
    assert webhook.admit(opted_out) == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }
    assert "patch" not in webhook.admit(POD, operation="UPDATE")


def foreign_pod() -> dict:
    pod = json.loads(json.dumps(POD))
    pod["spec"]["containers"].append({"name": "istio-proxy", "image": "proxyv2"})
    return pod


def test_failing_closed_denies_a_pod_that_cannot_be_injected(webhook):
    response = webhook.admit(foreign_pod())
    assert response["allowed"] is False
    assert "spec.containers[1].name" in response["status"]["message"]
    assert "another sidecar" in response["status"]["message"]


def test_failing_open_admits_it_unchanged_with_a_warning(certs):
    hook = Webhook(certs, "ignore")
    try:
        response = hook.admit(foreign_pod())
        assert response["allowed"] is True and "patch" not in response
        assert "another sidecar" in response["warnings"][0]
    finally:
        hook.proc.terminate()
        hook.proc.wait(timeout=10)


@pytest.mark.parametrize(
    "body, error",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected an AdmissionReview"),
        (
            b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}',
            "only admission.k8s.io/v1",
        ),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "request.uid",
        ),
        (b"\xff\xfe", "not JSON"),
    ],
    ids=["not-json", "not-an-object", "old-api-version", "no-uid", "not-utf8"],
)
def test_bad_reviews_get_an_error_answer(webhook, body, error):
    status, answer = webhook.post(body)
    assert status == 400
    assert error in json.loads(answer)["error"]
    assert webhook.alive()


def test_odd_objects_and_hostile_connections_do_not_take_the_webhook_down(webhook):
    odd = {"metadata": {"annotations": ["x"]}, "spec": {"containers": "web"}}
    response = webhook.admit(dict(odd, apiVersion="v1", kind="Pod"))
    assert response["allowed"] is False and "metadata.annotations" in response["status"]["message"]
    assert webhook.admit({"apiVersion": "v1", "kind": "Pod"})["allowed"] is False
    # Plain HTTP on the TLS port, a client that says nothing and goes, an oversized body.
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as sock:
        sock.sendall(b"POST /inject HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        sock.recv(100)
    socket.create_connection(("127.0.0.1", webhook.port), timeout=5).close()
    # An oversized body is refused from its head alone, before it is read.
    with webhook.context.wrap_socket(
        socket.create_connection(("127.0.0.1", webhook.port), timeout=5),
        server_hostname="localhost",
    ) as tls:
        tls.sendall(b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 4194304\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 413 ")
    assert webhook.alive()


def test_a_client_without_the_ca_refuses_the_certificate(webhook):
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://127.0.0.1:{webhook.port}/healthz",
            timeout=5,
            context=ssl.create_default_context(),
        )
