"""What node services make of the local cache of remote clusters (`PROPOLIS_CLUSTERMESH_CACHE_V1`).

A cached key is ``<cluster>.<export key>`` (`subjects.clustermesh_cache_key`). Remote identities keep
their numbers (each cluster allocates in its own ``cluster_id << 16`` range, and KVStoreMesh imports
only a remote's own range); a remote endpoint IP becomes an `EndpointRecord` in the pseudo-namespace
``@<cluster>``, which no Kubernetes namespace can be, so it never collides with a local pod.
"""

from __future__ import annotations

from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import ClusterService, EndpointRecord, IpcacheEntry
from propolis.lb.desired import BACKEND_ACTIVE, Backend

REMOTE_NAMESPACE_PREFIX = "@"


def split_cache_key(key: str) -> tuple[str, str, str]:
    """``c2.ip.10.1.2.3`` -> (``c2``, ``ip``, ``10.1.2.3``)."""
    cluster, export_key = subjects.parse_clustermesh_cache_key(key)
    kind, rest = subjects.parse_export_key(export_key)
    return cluster, kind, rest


def remote_endpoint(cluster: str, value: Any) -> EndpointRecord | None:
    """A remote ipcache entry as the endpoint record the datapath-writer's tables hold (None: not one)."""
    if not isinstance(value, IpcacheEntry):
        return None
    return EndpointRecord(REMOTE_NAMESPACE_PREFIX + cluster, value.ip, value.node, [value.ip], value.identity, [])


def endpoint_key(cluster: str, ip: str) -> tuple[str, str]:
    return REMOTE_NAMESPACE_PREFIX + cluster, ip


def remote_backends(remote_services: dict[tuple[str, str], dict[str, Any]], service: tuple[str, str]
                    ) -> dict[tuple[str, str], dict[str, list[Backend]]]:
    """The backends remote clusters share for one global Service, as `lb.desired_services` takes them."""
    by_port: dict[str, list[Backend]] = {}
    for cluster, shared in sorted((remote_services.get(service) or {}).items()):
        if not isinstance(shared, ClusterService) or not shared.shared:
            continue
        for key, rows in shared.backends.items():
            protocol = key.rpartition("/")[2] or "TCP"
            by_port.setdefault(key, []).extend(
                Backend(str(ip), int(port), protocol, BACKEND_ACTIVE, cluster=cluster, cluster_id=shared.cluster_id)
                for ip, port in rows)
    return {service: by_port}
