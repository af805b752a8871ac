"""Read the counter store into a summed snapshot, and render it: JSON, Envoy-style text, stage table."""

from __future__ import annotations

from pyproxy import counters as c
from pyproxy.chain.registry import factory_class
from pyproxy.config import ListenerMode, ProxyConfig
from pyproxy.counters import CounterStore
from pyproxy.grpc_metrics import grpc_snapshot
from pyproxy.protocol import STATUS_CLASSES


def snapshot(store: CounterStore, config: ProxyConfig) -> dict:
    """Every listener's counters summed over all workers (what /stats?format=json returns)."""
    slots = store.slots()
    listeners = {}
    for lconf in config.listeners:
        slot = slots.get(lconf.name)
        if slot is None:
            continue
        block = store.summed_block(slot)
        stages = {
            name: {"ns": block[c.STAGE_NS + i], "events": block[c.STAGE_EVENTS + i]}
            for i, name in enumerate(c.STAGES)
        }
        base = len(c.STAGES)
        filter_counters = {}
        for i, name in enumerate(lconf.filter_names):
            stages[f"filter:{name}"] = {
                "ns": block[c.STAGE_NS + base + i],
                "events": block[c.STAGE_EVENTS + base + i],
            }
            counter_base = c.FILTER_COUNTERS_BASE + i * c.FILTER_COUNTERS_PER_SLOT
            names = _counter_names(lconf, name)
            filter_counters[name] = {n: block[counter_base + k] for k, n in enumerate(names)}
        cumulative, buckets = 0, {}
        for bound, i in zip(c.BUCKETS, range(len(c.BUCKETS)), strict=True):
            cumulative += block[c.HIST_BASE + i]
            buckets[str(bound)] = cumulative
        listeners[lconf.name] = {
            "mode": lconf.mode.value,
            "kind": lconf.kind.value,
            "connections_total": block[c.CONNECTIONS_TOTAL],
            "connections_active": block[c.CONNECTIONS_ACTIVE],
            "messages": block[c.MESSAGES],
            "requests": block[c.REQUESTS],
            "express_requests": block[c.EXPRESS_REQUESTS],
            "native_requests": block[c.NATIVE_REQUESTS],
            "lane_reads": {
                "all": block[c.LANE_READS_WHOLE] + block[c.LANE_READS_PYTHON],
                "whole": block[c.LANE_READS_WHOLE],
            },
            "refused": {
                "connections": block[c.REFUSED_CONNECTIONS],
                "requests": block[c.REFUSED_REQUESTS],
            },
            "bytes": {
                "downstream_rx": block[c.DOWNSTREAM_RX],
                "downstream_tx": block[c.DOWNSTREAM_TX],
                "upstream_rx": block[c.UPSTREAM_RX],
                "upstream_tx": block[c.UPSTREAM_TX],
            },
            "stages": stages,
            "filters": filter_counters,
            "responses": {f"{k + 1}xx": block[c.STATUS_BASE + k] for k in range(STATUS_CLASSES)},
            "flags": {
                flag: block[c.FLAG_BASE + i]
                for i, flag in enumerate(c.FLAGS)
                if block[c.FLAG_BASE + i]
            },
            "rejected": {
                reason: block[c.REJECT_BASE + i]
                for i, reason in enumerate(c.REJECTS)
                if block[c.REJECT_BASE + i]
            },
            "duration": {
                "count": block[c.HIST_COUNT],
                "sum_seconds": block[c.HIST_SUM_NS] / 1e9,
                "buckets": buckets,
            },
        }
        if lconf.write == "zerocopy":
            listeners[lconf.name]["zerocopy"] = {
                name: block[c.ZC_BASE + i] for i, name in enumerate(c.ZC_FIELDS)
            }
        if lconf.mode is not ListenerMode.TCP:
            grpc = grpc_snapshot(store, slot)
            if lconf.mode is ListenerMode.GRPC or grpc["calls_started"]:
                listeners[lconf.name]["grpc"] = grpc
    return {"listeners": listeners, "wasm_metrics": store.guest_metrics.merged()}


def _counter_names(lconf, filter_name: str) -> tuple[str, ...]:
    specs = list(lconf.filters) + [s for r in lconf.routes for s in (r.filters or ())]
    for spec in specs:
        if spec.name == filter_name:
            try:
                return factory_class(spec.type).counter_names
            except ValueError:
                return ()
    return ()


def to_text(snap: dict) -> str:
    """Envoy-style `name: value` lines, one counter per line, sorted; the metrics filter
    programs define go under their own names, as Envoy shows them."""
    lines = []
    for name, metric in (snap.get("wasm_metrics") or {}).items():
        if metric["type"] == "histogram":
            lines.append(f"{name}: count={metric['count']} sum={metric['sum']}")
        else:
            lines.append(f"{name}: {metric['value']}")
    snap = {key: value for key, value in snap.items() if key != "wasm_metrics"}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            lines.append(f"{prefix}: {node}")

    walk("", snap)
    return "\n".join(sorted(lines)) + "\n"


def stage_table(snap: dict) -> str:
    """The per-stage breakdown per listener, like Table 2 of the MeshInsight paper."""
    out = []
    for name, listener in snap.get("listeners", {}).items():
        stages = listener["stages"]
        total = sum(s["ns"] for s in stages.values())
        unit = "message" if listener["mode"] == "tcp" else "request"
        per = listener["messages"] if unit == "message" else listener["requests"]
        out.append(
            f"listener {name} ({listener['mode']}, {listener['kind']}): {listener['connections_total']} connections, "
            f"{per} {unit}s, {listener['bytes']['downstream_rx']} B in / {listener['bytes']['downstream_tx']} B out"
        )
        out.append(f"  {'stage':<10} {'total ms':>10} {'µs/' + unit:>12} {'share':>7}")
        for stage, values in stages.items():
            ns = values["ns"]
            per_unit = ns / per / 1000 if per else 0.0
            share = ns / total * 100 if total else 0.0
            out.append(f"  {stage:<10} {ns / 1e6:>10.3f} {per_unit:>12.2f} {share:>6.1f}%")
        per_total = total / per / 1000 if per else 0.0
        out.append(
            f"  {'total':<10} {total / 1e6:>10.3f} {per_total:>12.2f} {100.0 if total else 0.0:>6.1f}%"
        )
        if listener.get("express_requests"):
            out.append(
                f"  express lane: {listener['express_requests']} of the {per} requests"
                f" ({listener['native_requests']} in the native lane)"
            )
        if listener["flags"]:
            out.append(
                "  response flags: " + ", ".join(f"{k}={v}" for k, v in listener["flags"].items())
            )
    return "\n".join(out) + "\n"
