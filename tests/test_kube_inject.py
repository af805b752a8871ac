"""`pyproxy inject`: golden files for every kind and annotation, schema validation against two
Kubernetes versions, idempotence, untouched fields, and clear errors that produce no output."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from pyproxy.cli import main

GOLDEN = Path(__file__).parent / "golden" / "kube"
INPUTS = ("kinds", "annotations")
# One version before native sidecars (sidecar first + postStart), one with them.
VERSIONS = ("1.27", "1.29")
UPDATE = os.environ.get("PYPROXY_UPDATE_GOLDEN") == "1"


def inject(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`pyproxy inject ARGS` through the CLI's own code, in this process (no start-up cost)."""
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        mock.patch("sys.stdin", io.StringIO(stdin)),
    ):
        try:
            code = main(["inject", *args])
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def injected(name: str, version: str) -> str:
    result = inject("-f", str(GOLDEN / f"{name}.yaml"), "--kubernetes-version", version)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(text: str) -> list[dict]:
    found = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        found += doc["items"] if doc.get("kind") == "List" else [doc]
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", INPUTS)
def test_injection_matches_the_golden_file(name, version):
    golden = GOLDEN / f"{name}.k{version}.out.yaml"
    output = injected(name, version)
    if UPDATE:
        golden.write_text(output)
    assert output == golden.read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_workload_kind_is_injected_and_other_kinds_are_kept_verbatim(version):
    source = (GOLDEN / "kinds.yaml").read_text()
    output = injected("kinds", version)
    # The Service and ConfigMap documents (with their comments and flow style) are unchanged.
    head = source.split("\n---\n")[:2]
    assert output.split("\n---\n")[:2] == head
    pods = {}
    for obj in objects(output):
        template = pod_template(obj)
        if template is not None:
            pods[obj["kind"]] = template
    assert set(pods) == {
        "Pod",
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Job",
        "CronJob",
    }
    for kind, template in pods.items():
        names = [c["name"] for c in template["spec"].get("initContainers", [])]
        names += [c["name"] for c in template["spec"]["containers"]]
        assert "pyproxy" in names and "pyproxy-init" in names, kind


def pod_template(obj: dict) -> dict | None:
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"].get("template") if isinstance(obj.get("spec"), dict) else None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", INPUTS)
def test_injected_objects_validate_against_the_published_schemas(name, version):
    for obj in objects(injected(name, version)):
        kubernetes_validate.validate(obj, f"{version}.0", strict=True)


def test_native_sidecar_output_is_rejected_by_a_cluster_without_native_sidecars():
    """The schema check has teeth: 1.27 knows no container restartPolicy."""
    pod = next(o for o in objects(injected("kinds", "1.29")) if o["kind"] == "Pod")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(pod, "1.27.0", strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", INPUTS)
def test_injecting_twice_changes_nothing(name, version):
    once = injected(name, version)
    twice = inject("--kubernetes-version", version, stdin=once)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once


@pytest.mark.parametrize("version", VERSIONS)
def test_injection_adds_fields_and_removes_none(version):
    """Every field of the input is in the output with its value (comments may go)."""

    def contained(small, big, path="") -> None:
        if isinstance(small, dict):
            assert isinstance(big, dict), path
            for key, value in small.items():
                assert key in big, f"{path}.{key} lost"
                contained(value, big[key], f"{path}.{key}")
        elif isinstance(small, list):
            assert isinstance(big, list), path
            # Injected containers and volumes are inserted; the user's keep their order.
            mine = [item for item in big if not _injected_item(item)]
            assert len(mine) == len(small), path
            for i, (a, b) in enumerate(zip(small, mine, strict=True)):
                contained(a, b, f"{path}[{i}]")
        else:
            assert small == big and type(small) is type(big), path

    for name in INPUTS:
        before = objects((GOLDEN / f"{name}.yaml").read_text())
        after = objects(injected(name, version))
        assert len(before) == len(after)
        for a, b in zip(before, after, strict=True):
            contained(a, b, f"{name}:{a['kind']}/{a['metadata']['name']}")


def _injected_item(item) -> bool:
    return isinstance(item, dict) and str(item.get("name", "")).startswith("pyproxy")


def sidecar_of(pod: dict) -> dict:
    spec = pod["spec"]
    return next(
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "pyproxy"
    )


def test_sidecar_is_hardened_and_ordered_for_each_kubernetes_version():
    legacy = next(o for o in objects(injected("kinds", "1.27")) if o["kind"] == "Pod")
    native = next(o for o in objects(injected("kinds", "1.29")) if o["kind"] == "Pod")
    # Before native sidecars: the sidecar is the first container, held by postStart until ready.
    assert [c["name"] for c in legacy["spec"]["containers"]] == ["pyproxy", "app"]
    assert legacy["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][:2] == [
        "pyproxy",
        "wait-ready",
    ]
    # With them: an init container that always restarts, after the capture, gated by a probe.
    assert [c["name"] for c in native["spec"]["initContainers"]] == ["pyproxy-init", "pyproxy"]
    sidecar = sidecar_of(native)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    security = sidecar["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (1337, 1337)
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    init = native["spec"]["initContainers"][0]
    assert init["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW"],
        "drop": ["ALL"],
    }
    assert {p["containerPort"] for p in sidecar["ports"]} == {15090, 15021}
    assert native["metadata"]["annotations"]["prometheus.io/port"] == "15090"


def test_annotations_reach_the_commands():
    pods = {o["metadata"]["name"]: o for o in objects(injected("annotations", "1.29"))}
    command = sidecar_of(pods["resources-and-image"])["command"]
    # cpuLimit 2500m: three workers; grace 60 s: a 57 s drain.
    assert command[command.index("--concurrency") + 1] == "3"
    assert command[command.index("--drain-timeout") + 1] == "57s"
    # The user's own scrape port wins over the sidecar's.
    assert pods["resources-and-image"]["metadata"]["annotations"]["prometheus.io/port"] == "9000"
    init = pods["capture-ports-and-ranges"]["spec"]["initContainers"][0]["command"]
    assert init[init.index("--exclude-outbound-cidrs") + 1] == "10.96.0.1/32"
    assert init[init.index("--inbound-ports") + 1] == "8080,8443"
    assert "--app-socket" in sidecar_of(pods["uds"])["command"]
    # Without a memoryLimit, eight workers get room for eight (64 MiB + 48 MiB each).
    eight = inject(
        stdin=POD.format(annotations="{sidecar.pyproxy.io/cpuLimit: '8'}", containers=APP)
    )
    sidecar = sidecar_of(yaml.safe_load(eight.stdout))
    assert sidecar["resources"]["limits"] == {"cpu": "8", "memory": "448Mi"}
    assert sidecar["command"][sidecar["command"].index("--concurrency") + 1] == "8"
    assert "pyproxy" not in str(pods["opted-out"]["spec"])
    assert "pyproxy" not in str(pods["host-network"]["spec"])


POD = """apiVersion: v1
kind: Pod
metadata:
  name: app
  annotations: {annotations}
spec:
  containers: [{containers}]
"""
APP = "{name: app, image: app:1}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: Pod\nmetadata: {name: [\n", "document 1: <yaml>: not YAML"),
        (
            "apiVersion: v1\nkind: Service\n---\napiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: web}\n",
            "document 2 (Deployment web): apiVersion: 'extensions/v1beta1' is not supported for Deployment (use apps/v1)",
        ),
        (
            POD.format(annotations="{}", containers=APP + ", {name: istio-proxy, image: proxyv2}"),
            "document 1 (Pod app): spec.containers[1].name: 'istio-proxy': the pod already carries another sidecar",
        ),
        (
            POD.format(annotations="{sidecar.istio.io/status: x}", containers=APP),
            "document 1 (Pod app): metadata.annotations[sidecar.istio.io/status]: the pod already carries another sidecar",
        ),
        (
            POD.format(annotations="{sidecar.pyproxy.io/mode: ftp}", containers=APP),
            "metadata.annotations[sidecar.pyproxy.io/mode]: 'ftp' is not one of tcp, http, grpc",
        ),
        (
            POD.format(
                annotations="{sidecar.pyproxy.io/excludeInboundPorts: '80,x'}", containers=APP
            ),
            "metadata.annotations[sidecar.pyproxy.io/excludeInboundPorts]:",
        ),
        (
            POD.format(annotations="{sidecar.pyproxy.io/cpuLimit: lots}", containers=APP),
            "metadata.annotations[sidecar.pyproxy.io/cpuLimit]: 'lots' is not a Kubernetes quantity",
        ),
        (
            POD.format(
                annotations='{sidecar.pyproxy.io/filters: \'[{"name": "nope"}]\'}', containers=APP
            ),
            "metadata.annotations[sidecar.pyproxy.io/filters]:",
        ),
        (
            POD.format(
                annotations="{}",
                containers="{name: app, image: a, ports: [{containerPort: 15021}]}",
            ),
            "spec.containers[0].ports[0].containerPort: 15021 is one of the sidecar's ports",
        ),
        (
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {schedule: x}\n",
            "document 1 (CronJob c): spec.jobTemplate: missing or not an object",
        ),
    ],
    ids=[
        "not-yaml",
        "unknown-api-version",
        "other-sidecar-container",
        "other-sidecar-annotation",
        "bad-mode",
        "bad-port-list",
        "bad-cpu",
        "unknown-filter",
        "reserved-port",
        "no-pod-template",
    ],
)
def test_bad_manifests_are_refused_with_the_document_and_field_and_no_output(text, message):
    good = "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec: {containers: [{name: a, image: a}]}\n---\n"
    result = inject(stdin=good + text)
    assert result.returncode == 2
    assert result.stdout == ""
    # The good first document shifts every position by one.
    shifted = message.replace("document 2", "document 3").replace("document 1", "document 2")
    assert shifted in result.stderr, result.stderr


def _paths(node, path=()):
    yield path
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        yield from _paths(child, path + (key,))


def _replaced(node, path, value):
    if not path:
        return value
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[path[0]] = _replaced(node[path[0]], path[1:], value)
    return copy


def test_any_field_of_the_wrong_type_is_an_error_or_is_carried_never_a_crash():
    """Every node of a rich pod and Deployment replaced by each odd value: injection either works
    or raises InjectError (reported with the document and field), nothing else."""
    from pyproxy.kube.injector import InjectError, Target
    from pyproxy.kube.manifest import inject_text

    docs = objects((GOLDEN / "annotations.yaml").read_text())[2:3] + [
        o for o in objects((GOLDEN / "kinds.yaml").read_text()) if o["kind"] == "Deployment"
    ]
    docs[0]["spec"]["terminationGracePeriodSeconds"] = 10
    odd = [None, "text", ["x"], {"a": 1}]
    failures, tried = [], 0
    for doc in docs:
        for path in _paths(doc):
            for value in odd:
                tried += 1
                text = yaml.safe_dump(_replaced(doc, path, value))
                try:
                    inject_text(text, Target("1.29"))
                except InjectError:
                    pass
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    failures.append((path, value, repr(exc)))
    assert tried > 150
    assert failures == []


@pytest.mark.parametrize(
    "argv, field",
    [
        (
            ["--app-socket", "unix:/run/a.sock", "--listen", "127.0.0.1:1", "--upstream", "x:2"],
            "--app-socket",
        ),
        (
            ["--app-socket", "unix:/run/a.sock", "-c", "proxy.yaml"],
            "--listen/--upstream/--sidecar/--app-socket",
        ),
        (["--sidecar", "--app-socket", "127.0.0.1:80"], "app_socket"),
    ],
    ids=["without-sidecar", "with-a-config-file", "not-a-unix-socket"],
)
def test_run_app_socket_is_only_for_the_sidecar_and_only_unix(argv, field):
    """The flag `ipc: uds` injection relies on: refused where it has no meaning."""
    from pyproxy.cli import build_parser, config_from_args
    from pyproxy.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace("/", ".")):
        config_from_args(build_parser().parse_args(["run", *argv]))


def test_run_app_socket_delivers_the_sidecar_inbound_listener_to_the_socket():
    from pyproxy.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["run", "--sidecar", "--app-socket", "unix:/run/app/{port}.sock"]
    )
    listeners = {lst.name: lst for lst in config_from_args(args).listeners}
    assert str(listeners["inbound"].app_socket) == "unix:/run/app/{port}.sock"
    assert listeners["outbound"].app_socket is None
