"""A custom Prometheus collector: metrics are built from the shared counters at scrape time only."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from pyproxy.counters import BUCKETS
from pyproxy.grpc_metrics import grpc_families


class StageCollector:
    """Turns a stats snapshot into metric families; nothing on the data path touches prometheus_client."""

    def __init__(self, take_snapshot: Callable[[], dict]) -> None:
        self._take_snapshot = take_snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._take_snapshot()
        labels = ["listener", "mode"]
        stage_seconds = CounterMetricFamily(
            "pyproxy_stage_seconds",
            "Time spent per proxy stage (ipc, read, write, notify, parse, other, filter:*)",
            labels=labels + ["stage"],
        )
        stage_events = CounterMetricFamily(
            "pyproxy_stage_events",
            "Operations counted per stage (syscalls, notifications)",
            labels=labels + ["stage"],
        )
        connections = CounterMetricFamily(
            "pyproxy_connections", "Downstream connections accepted", labels=labels
        )
        active = GaugeMetricFamily(
            "pyproxy_connections_active", "Downstream connections open now", labels=labels
        )
        byte_count = CounterMetricFamily(
            "pyproxy_bytes",
            "Bytes moved, by side and direction",
            labels=labels + ["side", "direction"],
        )
        messages = CounterMetricFamily(
            "pyproxy_messages", "TCP mode: downstream reads that carried data", labels=labels
        )
        requests = CounterMetricFamily("pyproxy_requests", "HTTP/gRPC requests", labels=labels)
        express = CounterMetricFamily(
            "pyproxy_express_requests",
            "HTTP/1.1 requests carried end to end by the express lane (a subset of requests)",
            labels=labels,
        )
        native = CounterMetricFamily(
            "pyproxy_native_requests",
            "HTTP/1.1 requests the native express lane carried in C (a subset of express requests)",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "pyproxy_refused",
            "Turned away beyond the worker's overload limits: connections closed, requests answered 503",
            labels=labels + ["kind"],
        )
        flags = CounterMetricFamily(
            "pyproxy_response_flags",
            "Connections or requests ended with a response flag",
            labels=labels + ["flag"],
        )
        rejected = CounterMetricFamily(
            "pyproxy_downstream_rejected",
            "Downstream input refused before it reached the upstream, by reason",
            labels=labels + ["reason"],
        )
        responses = CounterMetricFamily(
            "pyproxy_responses", "HTTP responses by status class", labels=labels + ["class"]
        )
        filter_counters = CounterMetricFamily(
            "pyproxy_filter_events",
            "Counters each filter declares (e.g. fault aborts_injected, ratelimit limited)",
            labels=labels + ["filter", "counter"],
        )
        zerocopy = CounterMetricFamily(
            "pyproxy_zerocopy",
            "MSG_ZEROCOPY accounting (write: zerocopy)",
            labels=labels + ["field"],
        )
        ipc_connections = CounterMetricFamily(
            "pyproxy_ipc_connections",
            "Downstream connections by the app-facing IPC path they took (tcp, uds, sockmap)",
            labels=labels + ["path"],
        )
        duration = HistogramMetricFamily(
            "pyproxy_request_duration_seconds",
            "Request duration (TCP mode: connection lifetime)",
            labels=labels,
        )
        for name, listener in snap["listeners"].items():
            key = [name, listener["mode"]]
            for stage, values in listener["stages"].items():
                stage_seconds.add_metric(key + [stage], values["ns"] / 1e9)
                stage_events.add_metric(key + [stage], values["events"])
            connections.add_metric(key, listener["connections_total"])
            for path, value in (listener.get("ipc_connections") or {}).items():
                ipc_connections.add_metric(key + [path], value)
            active.add_metric(key, listener["connections_active"])
            for field, value in listener["bytes"].items():
                side, direction = field.split("_")
                byte_count.add_metric(key + [side, direction], value)
            messages.add_metric(key, listener["messages"])
            requests.add_metric(key, listener["requests"])
            express.add_metric(key, listener["express_requests"])
            native.add_metric(key, listener["native_requests"])
            for kind, value in listener["refused"].items():
                refused.add_metric(key + [kind], value)
            for flag, value in listener["flags"].items():
                flags.add_metric(key + [flag], value)
            for reason, value in listener.get("rejected", {}).items():
                rejected.add_metric(key + [reason], value)
            if listener["mode"] != "tcp":
                for status_class, value in listener.get("responses", {}).items():
                    responses.add_metric(key + [status_class], value)
            for filter_name, counters in listener.get("filters", {}).items():
                for counter, value in counters.items():
                    filter_counters.add_metric(key + [filter_name, counter], value)
            for field, value in (listener.get("zerocopy") or {}).items():
                zerocopy.add_metric(key + [field], value)
            hist = listener["duration"]
            buckets = [(str(float(b)), hist["buckets"][str(b)]) for b in BUCKETS] + [
                ("+Inf", hist["count"])
            ]
            duration.add_metric(key, buckets, hist["sum_seconds"])
        yield from (
            stage_seconds,
            stage_events,
            connections,
            ipc_connections,
            active,
            byte_count,
            messages,
            requests,
            express,
            native,
            refused,
            flags,
            rejected,
            responses,
            filter_counters,
            zerocopy,
            duration,
        )
        yield from grpc_families(snap)
        yield from _guest_families(snap.get("wasm_metrics") or {})
        if "admin" in snap:
            yield CounterMetricFamily(
                "pyproxy_admin_refused_requests",
                "Admin requests refused for a foreign Host or Origin (browser page, DNS rebinding)",
                value=snap["admin"]["refused_requests"],
            )


def _guest_families(metrics: dict[str, dict]) -> Iterator[Metric]:
    """Filter programs' own metrics, under their names (made valid for Prometheus)."""
    for name, metric in sorted(metrics.items()):
        safe = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
        if not safe or safe[0].isdigit():
            safe = "_" + safe
        help_text = f"Defined by a filter program as {name!r} ({metric['type']})"
        if metric["type"] == "counter":
            yield CounterMetricFamily(safe, help_text, value=metric["value"])
        elif metric["type"] == "gauge":
            yield GaugeMetricFamily(safe, help_text, value=metric["value"])
        else:
            yield SummaryMetricFamily(
                safe, help_text, count_value=metric["count"], sum_value=metric["sum"]
            )


def exposition(take_snapshot: Callable[[], dict]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StageCollector(take_snapshot))
    return generate_latest(registry)
