"""Every NATS subject, JetStream KV bucket and key shape Propolis uses — defined here only.

Names carry a version (``propolis.v1.…``, ``PROPOLIS_…_V1``) so a schema change
can run beside the old one. Each bucket and subject has exactly one owning
service (`SLICES`); `permissions` turns that table into nats-server users so a
service cannot write another's slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from propolis.errors import ValidationError

PREFIX = "propolis.v1"

# --- KV buckets (desired state, one owner each) -------------------------------------------
K8S_BUCKET = "PROPOLIS_K8S_V1"              # mirrored Kubernetes objects; owner: k8s-watcher
IDENTITIES_BUCKET = "PROPOLIS_IDENTITIES_V1"  # identities + endpoint assignments; owner: identity-allocator
IPCACHE_BUCKET = "PROPOLIS_IPCACHE_V1"        # IP -> identity of each node's endpoints; owner: datapath-writer (per node)
HEARTBEATS_BUCKET = "PROPOLIS_HEARTBEATS_V1"  # last heartbeat of every service instance; owner: each service, own key
WIREGUARD_BUCKET = "PROPOLIS_WIREGUARD_V1"    # WireGuard public key per node (key: node name); owner: wireguard-keymgr
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


# --- KV keys: one encode/decode pair per key kind (nothing else splits or joins keys) -----------
#
# Keys are dot-separated tokens; a decoder splits off only the tokens its kind puts in front, so the
# last part keeps its dots (an IP, a DNS-subdomain object name). Decoders return None for a key of
# another kind (an owner's own `_…` keys share the k8s and identities buckets with the records).


class HeartbeatKey(NamedTuple):
    service: str
    node: str
    instance: str


def heartbeat_key(service: str, node: str, instance: str) -> str:
    """``<service>.<node>.<instance>`` in ``PROPOLIS_HEARTBEATS_V1``."""
    return key(token(service, what="service"), token(node, what="node"), token(instance, what="instance"))


def parse_heartbeat_key(k: str) -> HeartbeatKey | None:
    service, node, instance = (k.split(".", 2) + ["", ""])[:3]
    return HeartbeatKey(service, node, instance) if service and node and instance else None


def heartbeat_keys(service: str, node: str = "*") -> str:
    """The key filter for one service's heartbeats (of one node, or of every node with ``*``)."""
    return f"{token(service, what='service')}.{node if node == '*' else token(node, what='node')}.*"


class K8sKey(NamedTuple):
    kind: str  # the resource's plural, e.g. ``pods``
    namespace: str | None  # None: cluster-scoped
    name: str
    node: str = ""  # a node-scoped kind's node (`NODE_SCOPED_KINDS`), else ""


#: A cluster-scoped object's namespace token in its k8s key.
CLUSTER_SCOPE = "_"

#: Kinds whose objects belong to one node: the node is in their key (``pods.<node>.<namespace>.<name>``), so a
#: node's services watch only their own node's objects (`node_pods_keys`) and a 1,000-node cluster does not
#: deliver every Pod to every node. A Pod's ``spec.nodeName`` never changes once set (the key is stable); a Pod
#: not scheduled yet has no node, no IP and no reader, and is not mirrored until it is (`k8s/mirror.py`).
NODE_SCOPED_KINDS = ("pods",)


def k8s_key(kind: str, namespace: str | None, name: str, *, node: str = "") -> str:
    """``services.production.frontend``; cluster-scoped objects use ``_`` as namespace; node-scoped kinds
    (`NODE_SCOPED_KINDS`) put their node first: ``pods.w1.production.frontend-1`` (``node`` required)."""
    if kind in NODE_SCOPED_KINDS:
        return key(kind, token(node, what=f"{kind} node"), namespace or CLUSTER_SCOPE, name)
    return key(kind, namespace or CLUSTER_SCOPE, name)


def parse_k8s_key(k: str) -> K8sKey | None:
    """A mirrored object's key back into its parts; None for the owner's own keys (lease, watermark)."""
    if is_owner_key(k):
        return None
    kind, _, rest = k.partition(".")
    node = ""
    if kind in NODE_SCOPED_KINDS:
        node, _, rest = rest.partition(".")
        if not node:
            return None
    namespace, _, name = rest.partition(".")
    if not kind or not namespace or not name:
        return None
    return K8sKey(kind, None if namespace == CLUSTER_SCOPE else namespace, name, node)


def k8s_keys(kind: str, namespace: str | None = None) -> str:
    """The key filter for every object of one kind (in one namespace, when given; of every node for a
    node-scoped kind)."""
    if namespace is None:
        return f"{token(kind, what='kind')}.>"
    nodes = ".*" if kind in NODE_SCOPED_KINDS else ""
    return f"{token(kind, what='kind')}{nodes}.{token(namespace, what='namespace')}.>"


def node_pods_keys(node: str) -> str:
    """The key filter for the Pods of one node: ``pods.<node>.>``."""
    return f"pods.{token(node, what='node')}.>"


def filters_overlap(a: str, b: str) -> bool:
    """Whether some key matches both key filters (``*`` = one token, ``>`` = the rest): the filters of one
    watch must not overlap (nats-server refuses a consumer whose filter subjects do)."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


#: Key of the Watermark record in the k8s and identities buckets (see messages.Watermark).
WATERMARK_KEY = "_meta._.resourceversion"


def lease_key(name: str) -> str:
    """A leadership lease in its owner's bucket (`bus/lease.py`): ``_lease.<name>``."""
    return key("_lease", name)


K8S_WATCHER_LEASE_KEY = lease_key("k8s-watcher._")  # in PROPOLIS_K8S_V1: who mirrors the API
IDENTITY_GC_LEASE_KEY = lease_key("identity-gc")  # in PROPOLIS_IDENTITIES_V1: who collects unused identities


def is_owner_key(k: str) -> bool:
    """The owner's bookkeeping (its lease, its watermark), not one of the records the bucket holds."""
    return k.startswith("_")


# identities bucket: ``id.<number>`` -> IdentityRecord, ``labels.<hash>`` -> IdentityIndex,
# ``endpoints.<namespace>.<pod>`` -> EndpointRecord
IDENTITY_KEYS = "id.>"
ENDPOINT_KEYS = "endpoints.>"


def identity_key(number: int) -> str:
    return key("id", str(int(number)))


def parse_identity_key(k: str) -> int | None:
    head, _, rest = k.partition(".")
    return int(rest) if head == "id" and rest.isdigit() else None


def identity_labels_key(labels_hash: str) -> str:
    """The label set's index entry (the point where replicas agree on its number)."""
    return key("labels", token(labels_hash, what="labels hash"))


def endpoint_key(namespace: str, pod: str) -> str:
    return key("endpoints", namespace, pod)


def parse_endpoint_key(k: str) -> tuple[str, str] | None:
    """(namespace, pod) of an endpoint record's key."""
    head, _, rest = k.partition(".")
    namespace, _, pod = rest.partition(".")
    return (namespace, pod) if head == "endpoints" and namespace and pod else None


def ipcache_key(node: str, ip: str) -> str:
    return key(token(node, what="node"), ip)


def ipcache_keys(node: str) -> str:
    """The key filter for one node's ipcache entries."""
    return f"{token(node, what='node')}.>"


def parse_ipcache_key(k: str) -> tuple[str, str]:
    """(node, ip) of an ipcache key."""
    node, _, ip = k.partition(".")
    return node, ip


def wireguard_key(node: str) -> str:
    """A node's public key in ``PROPOLIS_WIREGUARD_V1``: the key is the node name."""
    return key(token(node, what="node"))


def fqdn_key(node: str) -> str:
    """A node's FQDN cache in ``PROPOLIS_FQDN_V1``: the key is the node name."""
    return key(token(node, what="node"))


def node_of_key(k: str) -> str:
    """The node a per-node key (wireguard, fqdn) belongs to: the key is the node name."""
    return k


# Cluster Mesh export (``PROPOLIS_CLUSTERMESH_V1``): ``cluster-config``, ``nodes.<node>``,
# ``identities.<number>``, ``ip.<ip>``, ``services.<namespace>.<name>``
CLUSTER_CONFIG_KEY = "cluster-config"


class ExportKey(NamedTuple):
    kind: str  # nodes | identities | ip | services | cluster-config
    rest: str  # what follows the kind (``""`` for cluster-config)


def export_node_key(node: str) -> str:
    return key("nodes", token(node, what="node"))


def export_identity_key(identity: int) -> str:
    return key("identities", str(int(identity)))


def export_ip_key(ip: str) -> str:
    return key("ip", ip)


def export_service_key(namespace: str, name: str) -> str:
    return key("services", namespace, name)


def parse_export_key(k: str) -> ExportKey:
    kind, _, rest = k.partition(".")
    return ExportKey(kind, rest)


def parse_namespaced_name(rest: str) -> tuple[str, str]:
    """``<namespace>.<name>`` (what follows the kind in a k8s or services export key) -> (namespace, name)."""
    namespace, _, name = rest.partition(".")
    return namespace, name


class ClusterMeshCacheKey(NamedTuple):
    cluster: str
    export_key: str


def clustermesh_cache_key(cluster: str, export_key: str) -> str:
    """A remote cluster's exported key in the local cache bucket: ``<cluster>.<export key>``."""
    return key(token(cluster, what="cluster"), export_key)


def parse_clustermesh_cache_key(k: str) -> ClusterMeshCacheKey:
    cluster, _, export_key = k.partition(".")
    return ClusterMeshCacheKey(cluster, export_key)


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
    def hb(svc: str) -> tuple[str, str]:
        return HEARTBEATS_BUCKET, f"{svc}.>"

    # a per-node instance beats only as its own node (key `<svc>.<node>.<instance>`, subject `…<svc>.<node>`)
    def node_hb(svc: str) -> tuple[str, str]:
        return hb(svc) if node == "*" else (HEARTBEATS_BUCKET, f"{svc}.{node}.>")

    def node_hb_subject(svc: str) -> str:
        return heartbeat_pattern(svc) if node == "*" else f"{PREFIX}.heartbeat.{svc}.{node}"

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
