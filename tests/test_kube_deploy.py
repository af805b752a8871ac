"""deploy/: the manifests validate against the Kubernetes schemas, the injected demo is what
`pyproxy inject` makes of the demo, the ConfigMap is a valid pyproxy config, and the Grafana
dashboard and Prometheus config name metrics and annotations pyproxy really has."""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, http_get, start_listener
from test_kube_inject import inject

from pyproxy.config import build_config
from pyproxy.kube import annotations as ann

DEPLOY = ROOT / "deploy"
MANIFESTS = [
    "demo/app.yaml",
    "demo/app.injected.yaml",
    "demo/configmap.yaml",
    "webhook/webhook.yaml",
]


@pytest.mark.parametrize("name", MANIFESTS)
def test_deploy_manifests_validate(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_injected_demo_is_current():
    result = inject("-f", str(DEPLOY / "demo" / "app.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DEPLOY / "demo" / "app.injected.yaml").read_text()


def test_demo_config_map_is_a_valid_pyproxy_config():
    config_map = yaml.safe_load((DEPLOY / "demo" / "configmap.yaml").read_text())
    config = build_config(yaml.safe_load(config_map["data"]["config.yaml"]), source="configmap")
    assert {listener.kind for listener in config.listeners} == {"inbound", "outbound"}


def exported_names(exposition: str) -> set[str]:
    """Sample names a scrape can carry, including those of families with no sample yet."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            names |= {family + s for s in suffixes.get(kind, [""])}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_name_metrics_pyproxy_exports(start_proxy, tmp_path, upstream):
    # An injected fault gives every family a sample: filter events and response flags too.
    body = "    filters:\n      - name: fault\n        config: {abort: {http_status: 503, percentage: 100}}"
    proxy, port = start_listener(start_proxy, tmp_path, upstream.address, body)
    assert http_get(f"http://127.0.0.1:{port}/x")[0] == 503
    status, scrape = http_get(proxy.admin + "/stats/prometheus")
    assert status == 200
    exported = exported_names(scrape.decode())
    dashboard = json.loads((DEPLOY / "grafana" / "pyproxy-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bpyproxy_[a-z_]+", target["expr"]))
    assert len(used) >= 8
    assert used <= exported, used - exported


def test_prometheus_keeps_pods_by_the_annotations_the_injector_writes():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    labels = {
        label
        for rule in config["scrape_configs"][0]["relabel_configs"]
        if rule.get("action") == "keep"
        for label in rule["source_labels"]
    }

    def meta(annotation: str) -> str:
        return "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)

    assert labels == {meta("prometheus.io/scrape"), meta(ann.STATUS)}
