"""The pod annotations users set to steer injection, validated into one immutable Options."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pyproxy.config import MODES
from pyproxy.iptables.rules import CaptureOptionError, options_from_strings

PREFIX = "sidecar.pyproxy.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
MODE = PREFIX + "mode"
CONFIG = PREFIX + "config"
FILTERS = PREFIX + "filters"
IPC = PREFIX + "ipc"
IMAGE = PREFIX + "image"
CAPTURE_MODE = PREFIX + "captureMode"
CPU = PREFIX + "cpu"
CPU_LIMIT = PREFIX + "cpuLimit"
MEMORY = PREFIX + "memory"
MEMORY_LIMIT = PREFIX + "memoryLimit"

# annotation -> the `pyproxy capture apply` option it sets (validated by the capture code itself).
CAPTURE = {
    PREFIX + "includeInboundPorts": "inbound_ports",
    PREFIX + "excludeInboundPorts": "exclude_inbound_ports",
    PREFIX + "includeOutboundPorts": "outbound_ports",
    PREFIX + "excludeOutboundPorts": "exclude_outbound_ports",
    PREFIX + "includeOutboundIPRanges": "outbound_cidrs",
    PREFIX + "excludeOutboundIPRanges": "exclude_outbound_cidrs",
}

DEFAULT_IMAGE = "pyproxy:0.1.0"
DEFAULT_RESOURCES = {CPU: "100m", MEMORY: "64Mi", CPU_LIMIT: "1", MEMORY_LIMIT: "256Mi"}
# Measured resident memory at rest (HTTP mode): 37 MiB for one worker, ~37 + 30·N MiB for N >= 2.
# Without a memoryLimit annotation, the limit grows with the workers so many CPUs do not OOM.
MEMORY_PER_WORKER_MIB, MEMORY_BASE_MIB = 48, 64
IPC_KINDS = ("tcp", "uds")
CAPTURE_MODES = ("redirect", "tproxy")
# Kubernetes quantity: a number with an optional SI or binary suffix.
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_CPU_SCALE = {"m": 1e-3, None: 1.0, "k": 1e3}


class AnnotationError(ValueError):
    """An annotation's value is unusable; names the annotation."""

    def __init__(self, annotation: str, reason: str) -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation, self.reason = annotation, reason


@dataclass(frozen=True, slots=True)
class Options:
    """Everything the injector needs from a pod's annotations."""

    mode: str = "tcp"
    capture_mode: str = "redirect"
    ipc: str = "tcp"
    image: str = DEFAULT_IMAGE
    config_map: str | None = None
    filters: tuple[str, ...] = ()  # NAME=JSON, as `pyproxy run --filter` takes them
    capture: tuple[tuple[str, str], ...] = ()  # (option field, text) for `pyproxy capture apply`
    cpu: str = DEFAULT_RESOURCES[CPU]
    cpu_limit: str = DEFAULT_RESOURCES[CPU_LIMIT]
    memory: str = DEFAULT_RESOURCES[MEMORY]
    memory_limit: str = DEFAULT_RESOURCES[MEMORY_LIMIT]

    @property
    def concurrency(self) -> int:
        return workers_for(self.cpu_limit)


def workers_for(cpu_limit: str) -> int:
    """One worker per CPU of the limit, rounded up: the proxy can use what it may burst to."""
    return max(1, math.ceil(cpu_cores(cpu_limit)))


def opted_out(annotations: Mapping[str, str]) -> bool:
    return str(annotations.get(INJECT, "true")).strip().lower() in ("false", "no", "off", "0")


def cpu_cores(text: str) -> float:
    match = _QUANTITY.match(text)
    if match is None or match.group(2) not in _CPU_SCALE:
        raise ValueError(f"{text!r} is not a CPU quantity (e.g. 500m, 2)")
    return float(match.group(1)) * _CPU_SCALE[match.group(2)]


def _choice(
    annotations: Mapping[str, str], name: str, choices: tuple[str, ...], default: str
) -> str:
    value = str(annotations.get(name, default)).strip().lower()
    if value not in choices:
        raise AnnotationError(name, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _quantity(annotations: Mapping[str, str], name: str) -> str:
    value = str(annotations.get(name, DEFAULT_RESOURCES[name])).strip()
    match = _QUANTITY.match(value)
    if match is None or (name in (CPU, CPU_LIMIT) and match.group(2) not in _CPU_SCALE):
        raise AnnotationError(name, f"{value!r} is not a Kubernetes quantity (e.g. 500m, 128Mi)")
    return value


def _filters(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """A JSON list of {"name": ..., "config": {...}}, in chain order."""
    text = annotations.get(FILTERS)
    if text is None:
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(FILTERS, f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and set(i) <= {"name", "config"}
        for i in items
    ):
        raise AnnotationError(FILTERS, 'expected a list of {"name": ..., "config": {...}}')
    return tuple(
        f"{i['name']}={json.dumps(i.get('config') or {}, separators=(',', ':'))}" for i in items
    )


def parse(annotations: Mapping[str, str]) -> Options:
    """Validated options; AnnotationError names the first annotation at fault."""
    capture = {
        field: str(annotations[name]) for name, field in CAPTURE.items() if name in annotations
    }
    try:
        options_from_strings(capture)
    except CaptureOptionError as exc:
        name = next(n for n, f in CAPTURE.items() if f == exc.option)
        raise AnnotationError(name, exc.reason) from None
    config_map = annotations.get(CONFIG)
    if config_map is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", config_map):
        raise AnnotationError(CONFIG, f"{config_map!r} is not a ConfigMap name")
    image = str(annotations.get(IMAGE, DEFAULT_IMAGE)).strip()
    if not image or any(c.isspace() for c in image):
        raise AnnotationError(IMAGE, f"{image!r} is not an image reference")
    resources = {name: _quantity(annotations, name) for name in DEFAULT_RESOURCES}
    if cpu_cores(resources[CPU]) > cpu_cores(resources[CPU_LIMIT]):
        raise AnnotationError(
            CPU, f"request {resources[CPU]} exceeds the limit {resources[CPU_LIMIT]}"
        )
    if MEMORY_LIMIT not in annotations:
        workers = workers_for(resources[CPU_LIMIT])
        needed = MEMORY_BASE_MIB + MEMORY_PER_WORKER_MIB * workers
        resources[MEMORY_LIMIT] = f"{max(256, needed)}Mi"
    return Options(
        mode=_choice(annotations, MODE, MODES, "tcp"),
        capture_mode=_choice(annotations, CAPTURE_MODE, CAPTURE_MODES, "redirect"),
        ipc=_choice(annotations, IPC, IPC_KINDS, "tcp"),
        image=image,
        config_map=config_map,
        filters=_filters(annotations),
        capture=tuple(capture.items()),
        cpu=resources[CPU],
        cpu_limit=resources[CPU_LIMIT],
        memory=resources[MEMORY],
        memory_limit=resources[MEMORY_LIMIT],
    )
