"""The image (deploy/Dockerfile on a debootstrapped Debian, built by deploy/build-image.sh) runs
the sidecar as uid 1337 with the native module, and `podman kube play` runs the injected pod."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, http_get, require_capability
from test_kube_inject import inject

CONF = ROOT / "deploy" / "podman" / "containers.conf"
ENV = dict(os.environ, CONTAINERS_CONF=str(CONF))
TAG = "localhost/pyproxy:0.1.0"
# The first build debootstraps Debian and installs packages; later ones reuse the cached image.
BUILD_TIMEOUT = 900
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 120)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    require_capability("root", os.geteuid() == 0)
    for tool in ("podman", "runc", "debootstrap"):
        require_capability(tool, shutil.which(tool) is not None)
    result = subprocess.run(
        [str(ROOT / "deploy" / "build-image.sh")],
        env=dict(ENV, PYPROXY_IMAGE_TAG=TAG),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return TAG


def test_image_runs_as_1337_with_the_native_module(image):
    check = "id -u; id -g; python3 -c 'from pyproxy import native; print(native.AVAILABLE)'"
    out = podman("run", "--rm", image, "sh", "-c", check).stdout.split()
    assert out == ["1337", "1337", "True"]


APP = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations:
    sidecar.pyproxy.io/mode: http
    sidecar.pyproxy.io/image: {image}
    # podman 4.3 runs init containers only with this (its default `once` races on removal).
    io.podman.annotations.init.container.type: always
spec:
  # podman applies the pod's restart policy to init containers too: OnFailure runs them once.
  restartPolicy: OnFailure
  containers:
  - name: app
    image: {image}
    command: ["python3", "-m", "http.server", "8080"]
    ports: [{{containerPort: 8080}}]
    securityContext: {{runAsUser: 1000}}
"""


def injected_without_native_sidecars(text: str) -> str:
    result = inject("--kubernetes-version", "1.27", stdin=text)  # podman 4.3 has none
    assert result.returncode == 0, result.stderr
    # podman refuses two downward-API fields the kubelet fills in: a podman pod has no namespace
    # (give the value the kubelet would, "default" here) and no IP before it runs (leave it out:
    # the node id then has an empty IP part, as the proxy's identity allows).
    pod = yaml.safe_load(result.stdout)
    [sidecar] = [c for c in pod["spec"]["containers"] if c["name"] == "pyproxy"]
    fields = {var["name"]: var["valueFrom"]["fieldRef"]["fieldPath"] for var in sidecar["env"]}
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
    }
    sidecar["env"] = [var for var in sidecar["env"] if var["name"] == "POD_NAME"]
    sidecar["env"].append({"name": "POD_NAMESPACE", "value": "default"})
    return yaml.safe_dump(pod, sort_keys=False)


def inspect(container: str) -> dict:
    return json.loads(podman("inspect", container).stdout)[0]


def wait_live(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_get(url, timeout=2) == (200, b"LIVE\n"):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not LIVE after {timeout}s"
        time.sleep(0.5)


def pod_ip(name: str) -> str:
    infra = podman("pod", "inspect", name, "--format", "{{.InfraContainerID}}").stdout.strip()
    networks = inspect(infra)["NetworkSettings"]["Networks"]
    return next(iter(networks.values()))["IPAddress"]


def test_podman_kube_play_runs_the_injected_pod(image, tmp_path):
    name = f"ppk{os.getpid()}"
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(injected_without_native_sidecars(APP.format(name=name, image=image)))
    try:
        podman("kube", "play", str(manifest), timeout=180)
        ip = pod_ip(name)
        wait_live(f"http://{ip}:15021/healthz/ready")
        # The capture ran (once, successfully) as root with only its two capabilities.
        init = inspect(f"{name}-pyproxy-init")
        assert init["State"]["ExitCode"] == 0
        assert sorted(init["EffectiveCaps"]) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        sidecar = inspect(f"{name}-pyproxy")
        assert sidecar["Config"]["User"] == "1337:1337"
        assert sidecar["HostConfig"]["ReadonlyRootfs"] is True
        assert sidecar["EffectiveCaps"] in (None, [])
        # Traffic to the app's port goes through the sidecar, which counts it.
        status, body = http_get(f"http://{ip}:8080/")
        assert status == 200 and b"Directory listing" in body
        _, metrics = http_get(f"http://{ip}:15090/metrics")
        assert b'pyproxy_requests_total{listener="inbound",mode="http"} 1.0' in metrics
        # SIGTERM (as the kubelet sends it) drains and exits cleanly, well within the grace time.
        podman("stop", "--time", "20", f"{name}-pyproxy", timeout=60)
        assert inspect(f"{name}-pyproxy")["State"]["ExitCode"] == 0
    finally:
        podman("pod", "rm", "--force", "--time", "0", name, check=False, timeout=60)
