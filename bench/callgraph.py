"""The extended call graph a prediction runs on, read from YAML/JSON or built from Jaeger / OTLP traces.

A graph is a tree of calls. Each call names its callee service, the sizes of
its request and response, its rate (inherited from the parent call when not
given), the callee's own work time (and, optionally, its RPC stack's CPU, `app_us`),
and its place among its siblings: calls
of one parent with the same `group` run in parallel, groups run one after
another in ascending order. The caller of a call is the callee of its parent;
the root call comes from outside the mesh (no sidecar on the caller's side).

YAML/JSON form::

    services:
      frontend: {mode: http, filters: [fault], ipc: tcp}
      cart: {mode: grpc}
    calls:
      - {id: root, callee: frontend, request: 200, response: 2000, rate: 100, work_us: 300}
      - {id: c1, parent: root, callee: cart, request: 100, response: 400, group: 0, work_us: 80}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

MODES = ("tcp", "http", "http2", "grpc")
DEFAULT_SIZE = 100


class GraphError(ValueError):
    """The graph or trace file is malformed; the message names the place and the reason."""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    mode: str = "http"
    filters: tuple[str, ...] = ()
    ipc: str = "tcp"
    sidecar: bool = True


@dataclass(slots=True)
class Call:
    id: str
    callee: str
    parent: str | None = None
    request: int = DEFAULT_SIZE
    response: int = DEFAULT_SIZE
    rate: float | None = None
    work_ns: float = 0.0
    network_ns: float = 0.0
    group: int = 0
    # the callee's own CPU besides its work (its RPC stack): half taking the call, half
    # answering it; only apps that share a CPU wait for it (see `schedule`)
    app_ns: float = 0.0
    # the caller's own CPU for this call (its RPC stack as a client): half sending it, half
    # taking the answer, next to this call only, not to its siblings (see `schedule`)
    client_ns: float = 0.0
    children: list[Call] = field(default_factory=list)


@dataclass(slots=True)
class CallGraph:
    name: str
    services: dict[str, Service]
    root: Call

    def calls(self) -> list[Call]:
        out, todo = [], [self.root]
        while todo:
            call = todo.pop()
            out.append(call)
            todo.extend(reversed(call.children))
        return out


def service_from_data(name: str, raw: object, where: str) -> Service:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: services.{name}: expected a mapping")
    mode = raw.get("mode", "http")
    if mode not in MODES:
        raise GraphError(f"{where}: services.{name}.mode: {mode!r} is not one of {MODES}")
    filters = raw.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise GraphError(f"{where}: services.{name}.filters: expected a list of filter types")
    return Service(
        name, mode, tuple(filters), str(raw.get("ipc", "tcp")), bool(raw.get("sidecar", True))
    )


def _number(raw: dict, key: str, where: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise GraphError(f"{where}.{key}: expected a number >= 0, got {value!r}")
    return float(value)


def graph_from_data(data: object, where: str = "<graph>") -> CallGraph:
    """Validate the YAML/JSON document into a call tree; every error names the field."""
    if not isinstance(data, dict):
        raise GraphError(f"{where}: expected a mapping with services and calls")
    services_raw = data.get("services") or {}
    if not isinstance(services_raw, dict):
        raise GraphError(f"{where}: services: expected a mapping")
    services = {name: service_from_data(name, raw, where) for name, raw in services_raw.items()}
    calls_raw = data.get("calls")
    if not isinstance(calls_raw, list) or not calls_raw:
        raise GraphError(f"{where}: calls: expected a non-empty list")
    by_id: dict[str, Call] = {}
    for i, raw in enumerate(calls_raw):
        at = f"{where}: calls[{i}]"
        if not isinstance(raw, dict) or "callee" not in raw:
            raise GraphError(f"{at}: expected a mapping with a callee")
        call_id = str(raw.get("id", f"call{i}"))
        if call_id in by_id:
            raise GraphError(f"{at}.id: {call_id!r} is used twice")
        callee = str(raw["callee"])
        services.setdefault(callee, Service(callee))
        rate = raw.get("rate")
        by_id[call_id] = Call(
            id=call_id,
            callee=callee,
            parent=None if raw.get("parent") is None else str(raw["parent"]),
            request=int(_number(raw, "request", at, DEFAULT_SIZE)),
            response=int(_number(raw, "response", at, DEFAULT_SIZE)),
            rate=None if rate is None else _number(raw, "rate", at, 0),
            work_ns=_number(raw, "work_us", at, 0) * 1000,
            network_ns=_number(raw, "network_us", at, 0) * 1000,
            app_ns=_number(raw, "app_us", at, 0) * 1000,
            client_ns=_number(raw, "client_us", at, 0) * 1000,
            group=int(_number(raw, "group", at, i)),
        )
    return _link(by_id, services, data.get("name", where), where)


def _link(by_id: dict[str, Call], services: dict[str, Service], name: str, where: str) -> CallGraph:
    roots = []
    for call in by_id.values():
        if call.parent is None:
            roots.append(call)
        elif call.parent not in by_id:
            raise GraphError(f"{where}: call {call.id!r}: parent {call.parent!r} is not a call")
        else:
            by_id[call.parent].children.append(call)
    if len(roots) != 1:
        raise GraphError(f"{where}: expected exactly one root call (no parent), found {len(roots)}")
    root = roots[0]
    seen: set[str] = set()
    todo = [root]
    while todo:
        call = todo.pop()
        seen.add(call.id)
        todo.extend(call.children)
    if len(seen) != len(by_id):
        raise GraphError(f"{where}: calls {sorted(set(by_id) - seen)} form a cycle")
    if root.rate is None:
        root.rate = 1.0
    return CallGraph(str(name), services, root)


def _read(path: Path) -> object:
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise GraphError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None


def load_graphs(paths: list[Path], services_path: Path | None = None) -> list[CallGraph]:
    """Call graphs from graph files and trace files (one graph per trace).

    `services_path` is a mapping of service settings laid over every graph:
    what traces cannot say (filters, IPC backend, which services have sidecars).
    """
    overlay: dict[str, Service] = {}
    if services_path is not None:
        raw = _read(services_path) or {}
        if not isinstance(raw, dict):
            raise GraphError(f"{services_path}: expected a mapping of service name to settings")
        overlay = {name: service_from_data(name, v, str(services_path)) for name, v in raw.items()}
    graphs = []
    for path in paths:
        data = _read(path)
        if isinstance(data, dict) and ("data" in data or "resourceSpans" in data):
            graphs += graphs_from_traces(data, str(path), overlay)
        else:
            graphs.append(with_services(graph_from_data(data, str(path)), overlay))
    return graphs


# ---- traces -----------------------------------------------------------------


@dataclass(slots=True)
class _Span:
    span_id: str
    parent_id: str | None
    service: str
    kind: str  # "server", "client" or ""
    start_ns: int
    end_ns: int
    attributes: dict


def _mode_of(attrs: dict) -> str:
    if attrs.get("rpc.system") == "grpc":
        return "grpc"
    if any(k in attrs for k in ("http.method", "http.request.method", "http.route", "http.url")):
        return "http"
    return "tcp"


def _size(attrs: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key in attrs:
            try:
                return int(attrs[key])
            except (TypeError, ValueError):
                continue
    return None


REQUEST_SIZE_KEYS = (
    "http.request.body.size",
    "http.request_content_length",
    "rpc.request.size",
    "messaging.message.body.size",
)
RESPONSE_SIZE_KEYS = (
    "http.response.body.size",
    "http.response_content_length",
    "rpc.response.size",
)


def _otlp_value(value: dict) -> object:
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in value:
            return value[key]
    return None


def _otlp_spans(data: dict, where: str) -> dict[str, list[_Span]]:
    kinds = {2: "server", 3: "client", "SPAN_KIND_SERVER": "server", "SPAN_KIND_CLIENT": "client"}
    traces: dict[str, list[_Span]] = {}
    for resource in data.get("resourceSpans", []):
        rattrs = {
            a["key"]: _otlp_value(a.get("value", {}))
            for a in resource.get("resource", {}).get("attributes", [])
        }
        service = str(rattrs.get("service.name", "unknown"))
        for scope in resource.get("scopeSpans", resource.get("instrumentationLibrarySpans", [])):
            for raw in scope.get("spans", []):
                try:
                    span = _Span(
                        raw["spanId"],
                        raw.get("parentSpanId") or None,
                        service,
                        kinds.get(raw.get("kind"), ""),
                        int(raw["startTimeUnixNano"]),
                        int(raw["endTimeUnixNano"]),
                        {
                            a["key"]: _otlp_value(a.get("value", {}))
                            for a in raw.get("attributes", [])
                        },
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise GraphError(f"{where}: OTLP span without {exc}") from None
                traces.setdefault(raw.get("traceId", ""), []).append(span)
    return traces


def _jaeger_spans(data: dict, where: str) -> dict[str, list[_Span]]:
    traces: dict[str, list[_Span]] = {}
    for trace in data.get("data", []):
        processes = trace.get("processes", {})
        spans = []
        for raw in trace.get("spans", []):
            tags = {t["key"]: t.get("value") for t in raw.get("tags", [])}
            parent = next(
                (r["spanID"] for r in raw.get("references", []) if r.get("refType") == "CHILD_OF"),
                None,
            )
            try:
                start = int(raw["startTime"]) * 1000
                spans.append(
                    _Span(
                        raw["spanID"],
                        parent,
                        processes.get(raw.get("processID"), {}).get("serviceName", "unknown"),
                        str(tags.get("span.kind", "")),
                        start,
                        start + int(raw["duration"]) * 1000,
                        tags,
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise GraphError(f"{where}: Jaeger span without {exc}") from None
        traces[trace.get("traceID", str(len(traces)))] = spans
    return traces


def _groups(children: list[_Span]) -> list[list[_Span]]:
    """Siblings that overlap in time ran in parallel; a gap starts the next sequential group."""
    groups: list[list[_Span]] = []
    end = None
    for span in sorted(children, key=lambda s: s.start_ns):
        if end is None or span.start_ns >= end:
            groups.append([span])
            end = span.end_ns
        else:
            groups[-1].append(span)
            end = max(end, span.end_ns)
    return groups


def _trace_graph(
    trace_id: str, spans: list[_Span], services: dict[str, Service], where: str
) -> CallGraph:
    by_id = {s.span_id: s for s in spans}
    has_kinds = any(s.kind == "server" for s in spans)

    # A call is the callee's server span (or, without span kinds, a span whose
    # parent ran in another service); a client span just before it times the hop.
    def is_call(s: _Span) -> bool:
        if has_kinds:
            return s.kind == "server"
        parent = by_id.get(s.parent_id or "")
        return parent is None or parent.service != s.service

    def call_parent(s: _Span) -> _Span | None:
        p = by_id.get(s.parent_id or "")
        while p is not None and not is_call(p):
            p = by_id.get(p.parent_id or "")
        return p

    def hop(s: _Span) -> _Span:
        """The client span wrapping this server span, if the caller recorded one."""
        p = by_id.get(s.parent_id or "")
        return p if p is not None and p.kind == "client" else s

    call_spans = [s for s in spans if is_call(s)]
    children: dict[str, list[_Span]] = {}
    for s in call_spans:
        parent = call_parent(s)
        children.setdefault(parent.span_id if parent else "", []).append(s)
    roots = children.get("", [])
    if len(roots) != 1:
        raise GraphError(f"{where}: trace {trace_id}: expected one root call, found {len(roots)}")
    calls: dict[str, Call] = {}
    for s in call_spans:
        attrs = {**hop(s).attributes, **s.attributes}
        mode = _mode_of(attrs)
        if s.service not in services:
            services[s.service] = Service(s.service, mode)
        groups = _groups([hop(k) for k in children.get(s.span_id, [])])
        # Its work is its self time, as Jaeger counts it: the time none of its calls was in
        # flight (a parallel group waits from its first call's start to its last one's end).
        waited = sum(max(k.end_ns for k in g) - min(k.start_ns for k in g) for g in groups)
        outer = hop(s)
        calls[s.span_id] = Call(
            id=s.span_id,
            callee=s.service,
            parent=(parent.span_id if (parent := call_parent(s)) else None),
            request=_size(attrs, REQUEST_SIZE_KEYS) or DEFAULT_SIZE,
            response=_size(attrs, RESPONSE_SIZE_KEYS) or DEFAULT_SIZE,
            work_ns=max(0.0, (s.end_ns - s.start_ns) - waited),
            network_ns=max(0.0, (outer.end_ns - outer.start_ns) - (s.end_ns - s.start_ns)),
        )
    for kids in children.values():
        for index, group in enumerate(_groups([hop(k) for k in kids])):
            for k in group:
                server = next(c for c in kids if hop(c) is k)
                calls[server.span_id].group = index
    return _link(calls, services, f"{where}#{trace_id}", where)


def read_otlp_lines(path: Path) -> dict:
    """One OTLP JSON document from a file of exports appended one per line (several services)."""
    spans: list = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                spans += json.loads(line)["resourceSpans"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GraphError(f"{path}:{number}: not an OTLP JSON export") from None
    return {"resourceSpans": spans}


def graphs_from_traces(
    data: dict,
    where: str = "<traces>",
    services: dict[str, Service] | None = None,
    since_ns: int = 0,
) -> list[CallGraph]:
    """One call graph per trace in a Jaeger JSON or OTLP JSON document.

    `services` overlays what traces cannot say (filters, IPC backend, which
    services have sidecars); the mode comes from the span attributes. With
    `since_ns`, only the traces whose every span started at or after it (ns
    since the epoch, as spans are stamped).
    """
    traces = _jaeger_spans(data, where) if "data" in data else _otlp_spans(data, where)
    traces = {t: spans for t, spans in traces.items() if min(s.start_ns for s in spans) >= since_ns}
    if not traces:
        raise GraphError(f"{where}: no spans" + (f" from {since_ns} ns on" if since_ns else ""))
    graphs = []
    for trace_id, spans in traces.items():
        known = dict(services or {})
        graphs.append(_trace_graph(trace_id, spans, known, where))
    return graphs


def with_services(graph: CallGraph, overlay: dict[str, Service]) -> CallGraph:
    """The graph with some services' sidecar settings replaced."""
    return replace(graph, services={**graph.services, **overlay})
