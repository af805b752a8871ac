"""The proxy's own identity (Envoy's Node: id, cluster, metadata), as filter programs read it.

Envoy takes it from `--service-node` / `--service-cluster` and its bootstrap; a sidecar's
comes from its pod (Istio names the node `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
and puts NAME, NAMESPACE and INSTANCE_IPS in its metadata). Here: PYPROXY_NODE_ID and
PYPROXY_NODE_CLUSTER when set; else, in a pod (POD_NAME, POD_NAMESPACE, POD_IP from the
downward API, which the injector sets), Istio's shape; else the host name and "pyproxy" (and the
host name as NAME).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import cache


@dataclass(frozen=True)
class Node:
    id: str
    cluster: str
    metadata: dict[str, str] = field(default_factory=dict, hash=False)


@cache
def local_node() -> Node:
    env = os.environ
    pod, namespace, ip = (
        env.get("POD_NAME", ""),
        env.get("POD_NAMESPACE", ""),
        env.get("POD_IP", ""),
    )
    metadata = {"NAME": pod or socket.gethostname(), "NAMESPACE": namespace, "INSTANCE_IPS": ip}
    metadata = {key: value for key, value in metadata.items() if value}
    if pod and namespace:
        default_id = f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"
        default_cluster = namespace
    else:
        default_id, default_cluster = socket.gethostname(), "pyproxy"
    return Node(
        env.get("PYPROXY_NODE_ID") or default_id,
        env.get("PYPROXY_NODE_CLUSTER") or default_cluster,
        metadata,
    )
