"""The injected pod really runs: its containers' exact commands, in a network namespace, in the
kubelet's order (capture init container with only its capabilities, the sidecar as uid 1337 held
behind its readiness gate, then the app), with traffic counted, drain on SIGTERM and a Job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import yaml
from pyproxy.iptables.netns import Pod, pods
from test_capture_pods import FETCH, Sidecar, settled

from pyproxy.kube.injector import UDS_DIR, Target
from pyproxy.kube.manifest import inject_text

PY = sys.executable
pytestmark = pytest.mark.usefixtures("require_netns")
APP_UID = 1000
APP_PORT = 8080
# The app: answers / at once and /slow?ms=N after N ms (an in-flight request to drain); listens
# on a port, or on unix:PATH (writable by the sidecar's uid, as a shared volume needs).
APP = """
import os, socketserver, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class App(BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/slow":
            time.sleep(int(query.split("=")[1]) / 1000)
        body = f"{sys.argv[2]}:{path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
if sys.argv[1].startswith("unix:"):
    server = UnixServer(sys.argv[1][5:], App)
    os.chmod(sys.argv[1][5:], 0o666)
else:
    server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), App)
print("READY", flush=True)
server.serve_forever()
"""
# A Job's app: one call out through the sidecar, report what the sidecar counted, then tell the
# sidecar it is done (POST /quitquitquit), as a Job's app must before native sidecars.
JOB = """
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    answer = r.read().decode()
with urllib.request.urlopen("http://127.0.0.1:15000/stats?format=json", timeout=5) as r:
    outbound = json.load(r)["listeners"]["outbound"]["requests"]
request = urllib.request.Request("http://127.0.0.1:15000/quitquitquit", method="POST")
urllib.request.urlopen(request, timeout=5).read()
print(json.dumps({"answer": answer, "outbound_requests": outbound}))
"""
MANIFEST = """apiVersion: {api}
kind: {kind}
metadata:
  name: app
  annotations: {{{annotations}}}
spec:
  terminationGracePeriodSeconds: 8
  restartPolicy: {restart}
  containers:
  - {{name: app, image: app:1, ports: [{{containerPort: {port}}}]}}
"""


def injected_pod(
    version: str, restart: str = "Always", annotations: str = "sidecar.pyproxy.io/mode: http"
) -> dict:
    text = MANIFEST.format(
        api="v1", kind="Pod", restart=restart, port=APP_PORT, annotations=annotations
    )
    return yaml.safe_load(inject_text(text, Target(version)))


def argv(command: list[str]) -> list[str]:
    """The image's `pyproxy` entry point is this checkout's."""
    assert command[0] == "pyproxy", command
    return [PY, "-m", "pyproxy", *command[1:]]


def security(container: dict) -> tuple[int, int, list[str]]:
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    caps = [c.lower() for c in context["capabilities"].get("add", [])]
    return context["runAsUser"], context["runAsGroup"], caps


@dataclass
class Kubelet:
    """Runs a pod spec the way the kubelet orders it, in one network namespace."""

    pod: Pod
    spec: dict
    client: Pod
    sidecar: Sidecar | None = None
    volume: str | None = None  # a host folder standing for the pod's shared UDS volume

    def popen(
        self, argv: list[str], uid: int, gid: int | None = None, **kwargs
    ) -> subprocess.Popen:
        """A container's process; with a volume, it sees that folder at the volume's mount path
        (each `ip netns exec` has its own mount namespace, so the bind stays its own)."""
        if self.volume is None:
            return self.pod.popen(argv, uid=uid, gid=gid, **kwargs)
        in_pod = self.pod.command(argv, uid, gid)
        assert in_pod[:4] == ["ip", "netns", "exec", self.pod.netns]
        mount = 'mount --bind "$0" "$1" && shift && exec "$@"'
        return self.pod.popen(["sh", "-c", mount, self.volume, UDS_DIR, *in_pod[4:]], **kwargs)

    def run_init(self, container: dict) -> None:
        uid, _, caps = security(container)
        assert uid == 0 and caps == ["net_admin", "net_raw"]
        # Root, but with nothing in the bounding set beyond the container's capabilities.
        only = ",".join(["-all"] + [f"+{c}" for c in caps])
        result = self.pod.run(
            ["setpriv", f"--bounding-set={only}", "--", *argv(container["command"])],
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    def start_sidecar(self, container: dict) -> None:
        uid, gid, caps = security(container)
        assert (uid, gid, caps) == (1337, 1337, [])
        gate = self.readiness_gate(container)
        time.sleep(0.5)
        assert gate.poll() is None, "the gate opened before the sidecar even started"
        proc = self.popen(
            argv(container["command"]),
            uid=uid,
            gid=gid,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.sidecar = Sidecar(self.pod, proc)
        assert gate.wait(timeout=30) == 0, gate.stderr.read()  # type: ignore[union-attr]
        # The gate opened because the sidecar is ready, as the kubelet's probe sees it.
        assert self.probe(container) == "LIVE\n"

    def readiness_gate(self, container: dict) -> subprocess.Popen:
        """What holds the app: the postStart hook (run in the sidecar container), or for a native
        sidecar the kubelet's startup probe (from outside the pod) until it passes."""
        if "lifecycle" in container:
            command = container["lifecycle"]["postStart"]["exec"]["command"]
            return self.pod.popen(argv(command), uid=1337, stderr=subprocess.PIPE, text=True)
        get = container["startupProbe"]["httpGet"]
        url = f"http://{self.pod.ipv4}:{get['port']}{get['path']}"
        return self.client.popen(
            argv(["pyproxy", "wait-ready", "--url", url, "--timeout", "30s"]),
            stderr=subprocess.PIPE,
            text=True,
        )

    def probe(self, container: dict) -> str:
        get = container["readinessProbe"]["httpGet"]
        return self.fetch(self.client, f"http://{self.pod.ipv4}:{get['port']}{get['path']}")

    def start(self, app: list[str]) -> None:
        """Init containers, then containers, in order; `app` stands for the app's image."""
        for container in self.spec.get("initContainers", []):
            if container.get("restartPolicy") == "Always":
                self.start_sidecar(container)
            else:
                self.run_init(container)
        for container in self.spec["containers"]:
            if container["name"] == "pyproxy":
                self.start_sidecar(container)
        assert self.sidecar is not None
        self.app = self.popen(app, uid=APP_UID, stdout=subprocess.PIPE, text=True)

    @staticmethod
    def fetch(pod: Pod, url: str) -> str:
        return pod.run([PY, "-c", FETCH, url], timeout=15).stdout


@contextmanager
def kubelet(spec: dict, volume: str | None = None) -> Iterator[Kubelet]:
    with pods(("client", "app"), bridge=True) as made:
        yield Kubelet(made["app"], spec, made["client"], volume=volume)


def start_app(pod: Pod, port: int, name: str) -> None:
    proc = pod.popen(
        [PY, "-c", APP, str(port), name], uid=APP_UID, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "READY"  # type: ignore[union-attr]


def metric(text: str, name: str, listener: str) -> float:
    prefix = f'{name}{{listener="{listener}",mode="http"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


@pytest.mark.parametrize("version", ["1.27", "1.29"])
def test_injected_pod_runs_gates_counts_and_drains(version):
    spec = injected_pod(version)["spec"]
    with kubelet(spec) as k:
        k.start([PY, "-c", APP, str(APP_PORT), "app"])
        assert k.app.stdout.readline().strip() == "READY"  # type: ignore[union-attr]
        sidecar = k.sidecar
        assert sidecar is not None
        url = f"http://{k.pod.ipv4}:{APP_PORT}"
        assert k.fetch(k.client, url + "/hello") == "app:/hello"
        # Prometheus scraping the sidecar's port sees the request on the inbound listener.
        metrics = k.fetch(k.client, f"http://{k.pod.ipv4}:15090/metrics")
        assert metric(metrics, "pyproxy_requests_total", "inbound") == 1

        # Drain: a request in flight when SIGTERM arrives still gets its whole answer.
        slow = k.client.popen(
            [PY, "-c", FETCH, url + "/slow?ms=1500"], stdout=subprocess.PIPE, text=True
        )
        active = settled(
            sidecar.stats, lambda s: s["inbound"]["connections_active"] == 1, timeout=10
        )
        assert active["inbound"]["connections_active"] == 1
        sidecar.proc.send_signal(signal.SIGTERM)
        out, _ = slow.communicate(timeout=15)
        assert (slow.returncode, out) == (0, "app:/slow")
        assert sidecar.proc.wait(timeout=10) == 0
        # Gone means gone: the captured port refuses rather than reaching the app around the proxy.
        refused = k.client.run([PY, "-c", FETCH, url + "/late"], timeout=15, check=False)
        assert refused.returncode != 0 and "app:" not in refused.stdout


def test_job_app_stops_its_sidecar_when_done():
    spec = injected_pod("1.27", restart="Never")["spec"]
    with kubelet(spec) as k:
        start_app(k.client, 9090, "remote")
        k.start([PY, "-c", JOB, f"http://{k.client.ipv4}:9090/work"])
        out, _ = k.app.communicate(timeout=30)
        assert k.app.returncode == 0
        report = json.loads(out)
        # The Job's call went out through the sidecar, and the sidecar then left on its own.
        assert report == {"answer": "remote:/work", "outbound_requests": 1}
        assert k.sidecar is not None
        assert k.sidecar.proc.wait(timeout=15) == 0


def test_uds_ipc_pod_reaches_its_app_over_the_shared_socket(tmp_path):
    """ipc: uds: the sidecar delivers inbound traffic to the app's socket in the shared volume."""
    spec = injected_pod(
        "1.29", annotations="sidecar.pyproxy.io/mode: http, sidecar.pyproxy.io/ipc: uds"
    )["spec"]
    assert {"name": "pyproxy-uds", "mountPath": UDS_DIR} in spec["containers"][0]["volumeMounts"]
    volume = tmp_path / "pyproxy-uds"
    volume.mkdir()
    volume.chmod(0o777)  # an emptyDir is writable by every container
    created = not os.path.exists(UDS_DIR)
    os.makedirs(UDS_DIR, exist_ok=True)  # the mount point; each process binds its own volume there
    try:
        with kubelet(spec, str(volume)) as k:
            k.start([PY, "-c", APP, f"unix:{UDS_DIR}/{APP_PORT}.sock", "uds-app"])
            assert k.app.stdout.readline().strip() == "READY"  # type: ignore[union-attr]
            assert (volume / f"{APP_PORT}.sock").is_socket()
            assert k.fetch(k.client, f"http://{k.pod.ipv4}:{APP_PORT}/hi") == "uds-app:/hi"
            assert k.sidecar is not None
            assert k.sidecar.stats()["inbound"]["requests"] == 1
            info = json.loads(k.sidecar.fetch("/server_info"))
            assert info["io_backends"]["listeners"]["inbound"]["ipc"] == "uds"
    finally:
        if created:
            os.rmdir(UDS_DIR)
