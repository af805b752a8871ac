"""Add the pyproxy init container and sidecar to a workload's pod template: the one injector."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyproxy.config import (
    ADMIN_DEFAULT,
    HEALTH_DEFAULT,
    INBOUND_PORT,
    OUTBOUND_PORT,
    PROMETHEUS_DEFAULT,
    ConfigError,
)
from pyproxy.iptables.cli import OPTIONS as CAPTURE_FLAGS
from pyproxy.kube import annotations as ann
from pyproxy.run_flags import config_from_args, run_parser

SIDECAR = "pyproxy"
INIT = "pyproxy-init"
PROXY_UID = 1337
ADMIN_PORT = int(ADMIN_DEFAULT.rsplit(":", 1)[1])
METRICS_PORT = int(PROMETHEUS_DEFAULT.rsplit(":", 1)[1])
HEALTH_PORT = int(HEALTH_DEFAULT.rsplit(":", 1)[1])
RESERVED_PORTS = (ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, HEALTH_PORT, METRICS_PORT)
READY_PATH = "/healthz/ready"
CONFIG_DIR = "/etc/pyproxy"
TMP_VOLUME, CONFIG_VOLUME, UDS_VOLUME = "pyproxy-tmp", "pyproxy-config", "pyproxy-uds"
VOLUMES = (TMP_VOLUME, CONFIG_VOLUME, UDS_VOLUME)
UDS_DIR = "/var/run/pyproxy"
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
NATIVE_SIDECAR_SINCE = (1, 29)
DEFAULT_KUBERNETES = "1.29"
DEFAULT_GRACE_SECONDS = 30
# SIGTERM gives the workers the drain time plus up to 2 s to exit; keep 1 s more in hand.
DRAIN_MARGIN_SECONDS = 3
READY_WAIT_SECONDS = 120

# kind -> (supported apiVersions, path from the object to its pod template; () = the object is one)
WORKLOADS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Pod": (("v1",), ()),
    "Deployment": (("apps/v1",), ("spec", "template")),
    "StatefulSet": (("apps/v1",), ("spec", "template")),
    "DaemonSet": (("apps/v1",), ("spec", "template")),
    "ReplicaSet": (("apps/v1",), ("spec", "template")),
    "Job": (("batch/v1",), ("spec", "template")),
    "CronJob": (("batch/v1",), ("spec", "jobTemplate", "spec", "template")),
}
FOREIGN_CONTAINERS = (
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "linkerd-proxy",
    "linkerd-init",
)
FOREIGN_ANNOTATIONS = ("sidecar.istio.io/status", "linkerd.io/proxy-version")


class InjectError(ValueError):
    """A document cannot be injected; the message names the document and the field."""

    def __init__(self, document: str, field: str, reason: str) -> None:
        super().__init__(f"{document}: {field}: {reason}")
        self.document, self.field, self.reason = document, field, reason


@dataclass(frozen=True, slots=True)
class Target:
    """What the cluster runs: decides native sidecars versus sidecar-first ordering."""

    kubernetes: str = DEFAULT_KUBERNETES

    @property
    def native_sidecars(self) -> bool:
        return parse_version(self.kubernetes) >= NATIVE_SIDECAR_SINCE


def parse_version(text: str) -> tuple[int, int]:
    parts = text.strip().lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"{text!r} is not a Kubernetes version like 1.29") from None


def describe(obj: Mapping[str, Any]) -> str:
    """How errors name an object: its kind and name, e.g. (Deployment web)."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        meta = {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    return f"({obj.get('kind', '<no kind>')} {name})"


def inject_object(obj: Any, target: Target, where: str) -> Any:
    """The object with pyproxy injected into its pod template, or the same object when there is
    nothing to do (not a workload, opted out, host network, already injected)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        return obj
    if obj["kind"] not in WORKLOADS:
        return obj
    versions, path = WORKLOADS[obj["kind"]]
    if obj.get("apiVersion") not in versions:
        raise InjectError(
            where,
            "apiVersion",
            f"{obj.get('apiVersion')!r} is not supported for {obj['kind']} (use {' or '.join(versions)})",
        )
    template: Any = obj
    for i, key in enumerate(path):
        template = template.get(key)
        if not isinstance(template, dict):
            raise InjectError(where, ".".join(path[: i + 1]), "missing or not an object")
    field = ".".join(path)
    injected = inject_template(template, target, where, field + "." if field else "")
    if injected is template:
        return obj
    result = copy.deepcopy(obj)
    if path:
        parent = result
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = injected
        return result
    return injected


def inject_template(template: dict, target: Target, where: str, prefix: str = "") -> dict:
    """A pod (or pod template) with pyproxy added; the same dict when nothing is to be done."""
    metadata = template.get("metadata") or {}
    spec = template.get("spec")
    if not isinstance(metadata, dict):
        raise InjectError(where, prefix + "metadata", "not an object")
    if not isinstance(spec, dict):
        raise InjectError(where, prefix + "spec", "missing or not an object")
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InjectError(where, prefix + "metadata.annotations", "not an object")
    # A host-network pod shares the node's namespace: capture rules there would hijack the node.
    if ann.opted_out(annotations) or spec.get("hostNetwork") is True:
        return template
    _check_containers(spec, annotations, where, prefix)
    if annotations.get(ann.STATUS) == "injected":
        return template
    try:
        options = ann.parse(annotations)
    except ann.AnnotationError as exc:
        raise InjectError(
            where, f"{prefix}metadata.annotations[{exc.annotation}]", exc.reason
        ) from None
    result = copy.deepcopy(template)
    try:
        _inject_spec(result["spec"], options, target)
    except ConfigError as exc:
        reason = f"{exc.path}: {exc.reason}" if exc.path else exc.reason
        raise InjectError(where, f"{prefix}metadata.annotations[{ann.FILTERS}]", reason) from None
    metadata = result["metadata"] = result.get("metadata") or {}
    added = metadata["annotations"] = metadata.get("annotations") or {}
    added[ann.STATUS] = "injected"
    # A user's own scrape settings win: injection never changes fields it did not add.
    added.setdefault("prometheus.io/scrape", "true")
    added.setdefault("prometheus.io/port", str(METRICS_PORT))
    added.setdefault("prometheus.io/path", "/metrics")
    return result


def _check_containers(spec: dict, annotations: Mapping[str, Any], where: str, prefix: str) -> None:
    for foreign in FOREIGN_ANNOTATIONS:
        if foreign in annotations:
            raise InjectError(
                where,
                f"{prefix}metadata.annotations[{foreign}]",
                "the pod already carries another sidecar",
            )
    injected = annotations.get(ann.STATUS) == "injected"
    for group in ("initContainers", "containers"):
        containers = spec.get(group) or []
        if not isinstance(containers, list):
            raise InjectError(where, f"{prefix}spec.{group}", "not a list")
        for i, container in enumerate(containers):
            field = f"{prefix}spec.{group}[{i}]"
            if not isinstance(container, dict):
                raise InjectError(where, field, "not an object")
            name = container.get("name")
            if name in FOREIGN_CONTAINERS:
                raise InjectError(
                    where, f"{field}.name", f"{name!r}: the pod already carries another sidecar"
                )
            if injected:
                continue
            if name in (SIDECAR, INIT):
                raise InjectError(
                    where, f"{field}.name", f"{name!r} is reserved for the injected sidecar"
                )
            ports = container.get("ports") or []
            if not isinstance(ports, list):
                raise InjectError(where, f"{field}.ports", "not a list")
            for j, port in enumerate(ports):
                if isinstance(port, dict) and port.get("containerPort") in RESERVED_PORTS:
                    raise InjectError(
                        where,
                        f"{field}.ports[{j}].containerPort",
                        f"{port['containerPort']} is one of the sidecar's ports {RESERVED_PORTS}",
                    )
            mounts = container.get("volumeMounts", [])
            if not isinstance(mounts, list):
                raise InjectError(where, f"{field}.volumeMounts", "not a list")
    if not spec.get("containers"):
        raise InjectError(where, f"{prefix}spec.containers", "a pod needs at least one container")
    volumes = spec.get("volumes", [])
    if not isinstance(volumes, list):
        raise InjectError(where, f"{prefix}spec.volumes", "not a list")
    for i, volume in enumerate(volumes):
        if not injected and isinstance(volume, dict) and volume.get("name") in VOLUMES:
            raise InjectError(
                where,
                f"{prefix}spec.volumes[{i}].name",
                f"{volume['name']!r} is reserved for the sidecar",
            )
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise InjectError(
            where,
            f"{prefix}spec.terminationGracePeriodSeconds",
            f"{grace!r} is not a number of seconds",
        )


def _inject_spec(spec: dict, options: ann.Options, target: Target) -> None:
    drain = max(
        1, spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS) - DRAIN_MARGIN_SECONDS
    )
    sidecar = sidecar_container(options, drain, target.native_sidecars)
    check_sidecar_command(sidecar["command"])
    init = init_container(options)
    volumes = spec.setdefault("volumes", [])
    volumes.append({"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    if options.config_map:
        volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": options.config_map}})
    if options.ipc == "uds":
        volumes.append({"name": UDS_VOLUME, "emptyDir": {"medium": "Memory"}})
        for container in spec["containers"]:
            container.setdefault("volumeMounts", []).append(
                {"name": UDS_VOLUME, "mountPath": UDS_DIR}
            )
    users_init = spec.get("initContainers") or []
    if target.native_sidecars:
        # The capture, then the proxy (started and ready), then the user's init containers, which
        # so already have a working proxy; the kubelet stops the proxy after the app containers.
        spec["initContainers"] = [init, sidecar, *users_init]
    else:
        # The user's init containers run before the capture exists (no proxy to talk to yet);
        # the sidecar starts first and its postStart hook holds the app until it is ready.
        spec["initContainers"] = [*users_init, init]
        spec["containers"] = [sidecar, *spec["containers"]]


def init_container(options: ann.Options) -> dict:
    command = ["pyproxy", "capture", "apply", CAPTURE_FLAGS["mode"][0], options.capture_mode]
    for field, text in options.capture:
        command += [CAPTURE_FLAGS[field][0], text]
    return {
        "name": INIT,
        "image": options.image,
        "command": command,
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            # iptables takes its lock file under /run.
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def sidecar_command(options: ann.Options, drain_seconds: int) -> list[str]:
    command = ["pyproxy", "run"]
    if options.config_map:
        command += ["-c", f"{CONFIG_DIR}/config.yaml"]
    else:
        command += ["--sidecar", "--mode", options.mode, "--capture-mode", options.capture_mode]
        if options.ipc == "uds":
            command += ["--app-socket", f"unix:{UDS_DIR}/{{port}}.sock"]
    for spec in options.filters:
        command += ["--filter", spec]
    command += [
        "--concurrency",
        str(options.concurrency),
        "--drain-timeout",
        f"{drain_seconds}s",
        "--prometheus",
        PROMETHEUS_DEFAULT,
        "--health",
        HEALTH_DEFAULT,
    ]
    return command


def check_sidecar_command(command: list[str]) -> None:
    """Validate the generated command exactly as the sidecar will (filters included), so a bad
    annotation fails injection instead of crash-looping the pod; ConfigError names the flag."""
    assert command[1] == "run", command
    if "-c" not in command:  # a ConfigMap's file is only seen by the sidecar itself
        config_from_args(run_parser().parse_args(command[2:]))


def sidecar_container(options: ann.Options, drain_seconds: int, native: bool) -> dict:

    def probe(period: int, failures: int) -> dict:
        return {
            "httpGet": {"path": READY_PATH, "port": HEALTH_PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
        }

    # TPROXY delivers to a transparent socket, which needs NET_ADMIN (as Istio grants).
    add = ["NET_ADMIN"] if options.capture_mode == "tproxy" else []
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": options.image,
        "command": sidecar_command(options, drain_seconds),
        "ports": [
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe(2, 3),
        "resources": {
            "requests": {"cpu": options.cpu, "memory": options.memory},
            "limits": {"cpu": options.cpu_limit, "memory": options.memory_limit},
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], **({"add": add} if add else {})},
        },
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
        # The pod's identity, the proxy's node (pyproxy/node.py), from the downward API.
        "env": [
            {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for name, path in (
                ("POD_NAME", "metadata.name"),
                ("POD_NAMESPACE", "metadata.namespace"),
                ("POD_IP", "status.podIP"),
            )
        ],
    }
    if options.config_map:
        container["volumeMounts"].append(
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}
        )
    if options.ipc == "uds":
        container["volumeMounts"].append({"name": UDS_VOLUME, "mountPath": UDS_DIR})
    if native:
        # The kubelet starts the next container only once the startup probe has passed.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = probe(1, READY_WAIT_SECONDS)
    else:
        # The kubelet starts the next container only once postStart has returned.
        container["lifecycle"] = {
            "postStart": {
                "exec": {
                    "command": ["pyproxy", "wait-ready", "--timeout", f"{READY_WAIT_SECONDS}s"]
                }
            }
        }
    return container
