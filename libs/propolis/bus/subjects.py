"""Every NATS subject, JetStream KV bucket and key shape Propolis uses — defined here only.

Names carry a version (``propolis.v1.…``, ``PROPOLIS_…_V1``) so a schema change
can run beside the old one. Each bucket and subject has exactly one owning
service (`SLICES`); `permissions` turns that table into nats-server users so a
service cannot write another's slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from propolis.errors import ValidationError

PREFIX = "propolis.v1"

# --- KV buckets (desired state, one owner each) -------------------------------------------
K8S_BUCKET = "PROPOLIS_K8S_V1"              # mirrored Kubernetes objects; owner: k8s-watcher
IDENTITIES_BUCKET = "PROPOLIS_IDENTITIES_V1"  # identities + endpoint assignments; owner: identity-allocator
IPCACHE_BUCKET = "PROPOLIS_IPCACHE_V1"        # IP -> identity of each node's endpoints; owner: datapath-writer (per node)
HEARTBEATS_BUCKET = "PROPOLIS_HEARTBEATS_V1"  # last heartbeat of every service instance; owner: each service, own key
WIREGUARD_BUCKET = "PROPOLIS_WIREGUARD_V1"    # WireGuard public key per node (key = node name); owner: wireguard-keymgr (per node)
#: Cluster Mesh: what this cluster exports to remote clusters (Cilium's `cilium/state/…` prefixes), and the local
#: cache of every remote cluster's export (KVStoreMesh's `cilium/cache/…`); owner of both: clustermesh-apiserver.
CLUSTERMESH_BUCKET = "PROPOLIS_CLUSTERMESH_V1"
CLUSTERMESH_CACHE_BUCKET = "PROPOLIS_CLUSTERMESH_CACHE_V1"
FQDN_BUCKET = "PROPOLIS_FQDN_V1"  # each node's learned DNS names -> IPs (key = node name); owner: dns-proxy (per node)
#: The NATS user remote clusters read the export with: it reads that bucket and writes nothing.
CLUSTERMESH_REMOTE_USER = "clustermesh-remote"

#: Heartbeats expire from the bucket after this many seconds without an update:
#: an instance that stops beating disappears from `propolis status` on its own.
HEARTBEAT_TTL_S = 30.0


@dataclass(frozen=True)
class BucketConfig:
    """How a bucket is created: history depth and per-entry max age (None = forever)."""

    name: str
    history: int = 1
    ttl_s: float | None = None


BUCKETS = {
    K8S_BUCKET: BucketConfig(K8S_BUCKET),
    IDENTITIES_BUCKET: BucketConfig(IDENTITIES_BUCKET),
    IPCACHE_BUCKET: BucketConfig(IPCACHE_BUCKET),
    HEARTBEATS_BUCKET: BucketConfig(HEARTBEATS_BUCKET, ttl_s=HEARTBEAT_TTL_S),
    WIREGUARD_BUCKET: BucketConfig(WIREGUARD_BUCKET),
    CLUSTERMESH_BUCKET: BucketConfig(CLUSTERMESH_BUCKET),
    CLUSTERMESH_CACHE_BUCKET: BucketConfig(CLUSTERMESH_CACHE_BUCKET),
    FQDN_BUCKET: BucketConfig(FQDN_BUCKET),
}

# --- plain subjects (streams that are not state) -------------------------------------------
HEARTBEAT_ALL = f"{PREFIX}.heartbeat.>"
FLOWS_ALL = f"{PREFIX}.flows.>"
EVENTS_ALL = f"{PREFIX}.events.>"

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-=]+$")
_KEY_RE = re.compile(r"^[-/_=\.a-zA-Z0-9]+$")


def token(value: str, *, what: str = "token") -> str:
    """Validate one subject token (no dots, no wildcards, no spaces)."""
    if not value or not _TOKEN_RE.match(value):
        raise ValidationError(what, f"invalid NATS subject token {value!r}")
    return value


def key(*parts: str) -> str:
    """Join KV key parts with dots, validating the result like nats.py's kv.py does."""
    k = ".".join(parts)
    if not _KEY_RE.match(k) or k.startswith(".") or k.endswith(".") or ".." in k:
        raise ValidationError("key", f"invalid KV key {k!r}")
    return k


def heartbeat_subject(service: str, node: str) -> str:
    return f"{PREFIX}.heartbeat.{token(service, what='service')}.{token(node, what='node')}"


def flows_subject(node: str) -> str:
    """The prefix of one node's flow subjects: subscribe to ``flows_subject(node) + ".>"``."""
    return f"{PREFIX}.flows.{token(node, what='node')}"


def flow_subject(node: str, verdict: str, src_namespace: str, dst_namespace: str) -> str:
    """Where a node's observer publishes one flow: ``propolis.v1.flows.<node>.<VERDICT>.<src ns>.<dst ns>``
    (``_`` = no namespace, e.g. world), so operators narrow server-side, e.g.
    ``propolis bus tail 'propolis.v1.flows.*.DROPPED.production.>'``."""
    return f"{PREFIX}.flows.{node}.{verdict}.{src_namespace or '_'}.{dst_namespace or '_'}"


def accesslog_subject(node: str) -> str:
    """The L7 proxy's flows of a node, for that node's Hubble observer: ``propolis.v1.accesslog.<node>``."""
    return f"{PREFIX}.accesslog.{token(node, what='node')}"


def lost_events_subject(node: str) -> str:
    """Hubble's lost-event notices of a node: ``propolis.v1.flows.<node>.lost``."""
    return f"{PREFIX}.flows.{token(node, what='node')}.lost"


#: Historic flow queries, to every node's observer at once (each answers the reply inbox in chunks).
HUBBLE_QUERY = f"{PREFIX}.hubble.query"


def events_subject(kind: str) -> str:
    """Operator-visible events, e.g. ``policy`` (refused policies), ``identity``."""
    return f"{PREFIX}.events.{token(kind, what='event kind')}"


def heartbeat_key(service: str, node: str, instance: str) -> str:
    return key(token(service), token(node), token(instance))


def k8s_key(kind: str, namespace: str | None, name: str) -> str:
    """``pods.production.frontend-1``; cluster-scoped objects use ``_`` as namespace."""
    return key(kind, namespace or "_", name)


#: Key of the Watermark record in the k8s and identities buckets (see messages.Watermark).
WATERMARK_KEY = "_meta._.resourceversion"


def ipcache_key(node: str, ip: str) -> str:
    return key(token(node, what="node"), ip)


def wireguard_key(node: str) -> str:
    """A node's public key in ``PROPOLIS_WIREGUARD_V1``: the key is the node name."""
    return key(token(node, what="node"))


def fqdn_key(node: str) -> str:
    """A node's FQDN cache in ``PROPOLIS_FQDN_V1``: the key is the node name."""
    return key(token(node, what="node"))


def clustermesh_cache_key(cluster: str, export_key: str) -> str:
    """A remote cluster's exported key in the local cache bucket: ``<cluster>.<export key>``."""
    return key(token(cluster, what="cluster"), export_key)


def endpoint_config_subject(node: str) -> str:
    """``propolis endpoint config`` asks the pod's node's datapath-writer here (request/reply): endpoint
    options are the writer's, as in Cilium they are the agent's (``cilium endpoint config``)."""
    return f"{PREFIX}.endpoint.config.{token(node, what='node')}"


def encryption_rotate_subject(node: str) -> str:
    """``propolis encrypt rotate-key`` asks a node's wireguard-keymgr here (request/reply)."""
    return f"{PREFIX}.encryption.rotate.{token(node, what='node')}"


# --- who owns what ------------------------------------------------------------------------

@dataclass(frozen=True)
class Slice:
    """What one service may write: KV key prefixes per bucket and plain subjects."""

    service: str
    kv_writes: tuple[tuple[str, str], ...]  # (bucket, key filter) e.g. (K8S_BUCKET, ">")
    publishes: tuple[str, ...]


def slices(node: str = "*") -> dict[str, Slice]:
    """The ownership table. ``node`` narrows per-node slices to one node (``*`` = any)."""
    hb = lambda svc: (HEARTBEATS_BUCKET, f"{svc}.>")  # noqa: E731 - tiny local helper
    # a per-node instance beats only as its own node (key `<svc>.<node>.<instance>`, subject `…<svc>.<node>`)
    node_hb = lambda svc: hb(svc) if node == "*" else (HEARTBEATS_BUCKET, f"{svc}.{node}.>")  # noqa: E731
    node_hb_subject = lambda svc: heartbeat_pattern(svc) if node == "*" else f"{PREFIX}.heartbeat.{svc}.{node}"  # noqa: E731,E501
    return {
        "k8s-watcher": Slice("k8s-watcher", ((K8S_BUCKET, ">"), hb("k8s-watcher")),
                             (heartbeat_pattern("k8s-watcher"), f"{PREFIX}.events.policy", f"{PREFIX}.events.k8s")),
        "identity-allocator": Slice("identity-allocator", ((IDENTITIES_BUCKET, ">"), hb("identity-allocator")),
                                    (heartbeat_pattern("identity-allocator"), f"{PREFIX}.events.identity")),
        "datapath-writer": Slice("datapath-writer", ((IPCACHE_BUCKET, f"{node}.>"), node_hb("datapath-writer")),
                                 (node_hb_subject("datapath-writer"), f"{PREFIX}.events.datapath")),
        "hubble": Slice("hubble", (node_hb("hubble"),),
                        (node_hb_subject("hubble"), f"{PREFIX}.flows.{node}", f"{PREFIX}.flows.{node}.>")),
        "l7-proxy": Slice("l7-proxy", (node_hb("l7-proxy"),),
                          (node_hb_subject("l7-proxy"), f"{PREFIX}.accesslog.{node}")),
        "dns-proxy": Slice("dns-proxy", ((FQDN_BUCKET, node), node_hb("dns-proxy")),
                           (node_hb_subject("dns-proxy"), f"{PREFIX}.accesslog.{node}")),
        "hubble-relay": Slice("hubble-relay", (hb("hubble-relay"),),
                              (heartbeat_pattern("hubble-relay"), HUBBLE_QUERY)),
        "wireguard-keymgr": Slice("wireguard-keymgr", ((WIREGUARD_BUCKET, node), node_hb("wireguard-keymgr")),
                                  (node_hb_subject("wireguard-keymgr"), f"{PREFIX}.events.encryption")),
        "clustermesh-apiserver": Slice("clustermesh-apiserver",
                                       ((CLUSTERMESH_BUCKET, ">"), (CLUSTERMESH_CACHE_BUCKET, ">"),
                                        hb("clustermesh-apiserver")),
                                       (heartbeat_pattern("clustermesh-apiserver"), f"{PREFIX}.events.clustermesh")),
    }


def heartbeat_pattern(service: str) -> str:
    return f"{PREFIX}.heartbeat.{service}.*"
