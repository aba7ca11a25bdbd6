"""Typed message schemas carried on the bus (payloads of subjects and KV values).

One dataclass per schema. Bump the minor version for added optional fields,
the major version for anything a reader could misread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from propolis.bus.codec import message


@message("heartbeat", (1, 1))
@dataclass
class Heartbeat:
    """Published by every service instance every few seconds (subject and KV)."""

    service: str
    node: str
    instance: str
    version: str
    pid: int
    started_at: float
    sent_at: float
    health: str  # "ok" | "degraded" | "stopped"
    components: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {state, reason}
    http: str = ""  # base URL of /healthz, /readyz, /metrics
    #: What this instance has caught up with, e.g. {"k8s_resource_version": "123", "policy_revision": 7}
    progress: dict[str, Any] = field(default_factory=dict)
    #: Feature states this instance knows about (for `propolis status`), e.g. {"KubeProxyReplacement": "True"}
    features: dict[str, Any] = field(default_factory=dict)
    #: 1.1: the longest gap between two beats; `propolis status` calls an instance stale after a few missed
    interval: float = 0.0


#: Heartbeat progress key of the datapath-writer: policy origin -> {"ns/pod": why} for every endpoint whose
#: policy its node failed to enforce; the k8s-watcher writes it onto those policies' status.
POLICY_FAILURES_KEY = "policy_failures"


@message("event", (1, 0))
@dataclass
class Event:
    """Something an operator should see: a refused policy, an allocation, an error."""

    kind: str  # e.g. "PolicyRefused"
    object: str  # e.g. "CiliumNetworkPolicy production/api-l7-policy"
    message: str
    service: str
    node: str
    time: float
    fields: dict[str, Any] = field(default_factory=dict)


@message("k8s-object", (1, 0))
@dataclass
class K8sObject:
    """A mirrored Kubernetes object, normalized to the fields Propolis uses."""

    kind: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    labels: dict[str, str] = field(default_factory=dict)
    #: what `k8s/kinds.py` keeps of the object besides metadata and status: the used part of a Pod's, Node's
    #: or Service's ``spec``, an EndpointSlice's top-level ``endpoints``/``ports``/``addressType``, a policy's
    #: ``spec`` and ``specs`` (so ``fields["spec"]`` is the policy's spec), annotations where a kind uses them
    fields: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


@message("bench", (1, 0))
@dataclass
class BenchProbe:
    """A benchmark payload shaped like a small flow record."""

    seq: int
    sent_ns: int
    node: str
    src: str
    dst: str
    port: int
    verdict: str


@message("lease", (1, 0))
@dataclass
class Lease:
    """A leadership lease held in the owner's own bucket (see bus/lease.py)."""

    holder: str
    renewed_at: float
    duration_s: float


@message("identity", (1, 0))
@dataclass
class IdentityRecord:
    """``id.<n>`` in the identities bucket: a numeric security identity and its labels."""

    id: int
    labels: list[str]
    reserved: bool = False


@message("identity-index", (1, 0))
@dataclass
class IdentityIndex:
    """``labels.<sha256>``: the label set's identity — the compare-and-set point of allocation."""

    id: int
    labels: list[str]


@message("endpoint", (1, 0))
@dataclass
class EndpointRecord:
    """``endpoints.<ns>.<pod>``: a pod's identity assignment, read by every node's datapath."""

    namespace: str
    name: str
    node: str
    ips: list[str]
    identity: int
    labels: list[str]
    named_ports: dict[str, list[Any]] = field(default_factory=dict)  # name -> [protocol, port]
    service_account: str = ""


@message("ipcache-entry", (1, 0))
@dataclass
class IpcacheEntry:
    """``<node>.<ip>`` in the ipcache bucket: an address the node's datapath owns and its identity."""

    ip: str
    prefix_len: int
    identity: int
    node: str
    node_ip: str = ""


@message("watermark", (1, 1))
@dataclass
class Watermark:
    """``_meta._.resourceversion`` in a bucket: everything before this key's latest revision reflects
    the Kubernetes API up to ``resource_version``. Watermarks travel in KV order behind the objects,
    so a consumer that has processed the watermark has processed everything it covers.

    1.1 ``epoch``: a random id the owner picks whenever it (re)fills its bucket (new leader, repair
    after a purge, a new API store). A consumer that saw the watermark vanish waits for a new epoch
    before it acts again: losing the bucket's contents is never read as "delete everything"."""

    resource_version: int
    time: float
    epoch: str = ""


@message("flow", (1, 0))
@dataclass
class FlowMessage:
    """One Hubble flow on ``propolis.v1.flows.<node>.<verdict>.<src ns>.<dst ns>``.

    ``seq`` counts the node observer's flows from 1 (per observer instance, named by ``instance``),
    so a subscriber sees exactly how many it missed between the observer and itself."""

    node: str
    instance: str
    seq: int
    flow: dict[str, Any]


@message("lost-events", (1, 0))
@dataclass
class LostEvents:
    """Hubble's LostEvent: ``source`` PERF_EVENT_RING_BUFFER (the BPF ring was full),
    OBSERVER_EVENTS_QUEUE, HUBBLE_RING_BUFFER (a reader was overrun) or NATS_SUBSCRIBER (a bus
    subscriber missed published flows); ``num_events_lost`` since the previous report."""

    source: str
    num_events_lost: int
    node: str
    time: str
    cpu: int = -1


@message("flow-query", (1, 0))
@dataclass
class FlowQuery:
    """A historic query to the nodes' observers (``propolis.v1.hubble.query``, answered in FlowBatch chunks)."""

    whitelist: list[dict[str, Any]] = field(default_factory=list)
    blacklist: list[dict[str, Any]] = field(default_factory=list)
    number: int = 0  # 0 = all matching
    first: bool = False  # oldest N instead of newest N
    since: str = ""  # RFC 3339 bounds (compared as text: fixed-width UTC)
    until: str = ""
    nodes: list[str] = field(default_factory=list)  # empty = every node answers


@message("flow-batch", (1, 0))
@dataclass
class FlowBatch:
    """A chunk of a query's answer; the last chunk of a node has ``done`` set."""

    node: str
    flows: list[list[Any]]  # [seq, flow] pairs, oldest first
    done: bool = False
    num_flows: int = 0  # ring occupancy (the node's status)
    max_flows: int = 0
    seen_flows: int = 0
    error: str = ""
    instance: str = ""  # the observer instance and its last sequence number at answer time:
    last_seq: int = 0   # a follower continues after it without duplicates or holes


@message("wireguard-node-key", (1, 0))
@dataclass
class WireguardNodeKey:
    """``<node>`` in ``PROPOLIS_WIREGUARD_V1``: the node's WireGuard public key (base64), written by its
    wireguard-keymgr only (the private key never leaves the node)."""

    node: str
    public_key: str
    listen_port: int
    rotated_at: float = 0.0  # when this key replaced the previous one (0 = first key)


@message("endpoint-config", (1, 0))
@dataclass
class EndpointConfig:
    """``propolis endpoint config NS/POD OPTION=VALUE…`` on ``endpoint_config_subject(node)``: the options to
    change (none = just read); the writer answers with the options the endpoint has now, or ``error``."""

    namespace: str
    pod: str
    options: dict[str, str] = field(default_factory=dict)
    error: str = ""


@message("clustermesh-cluster-config", (1, 0))
@dataclass
class ClusterConfig:
    """``cluster-config`` in ``PROPOLIS_CLUSTERMESH_V1`` (Cilium's ``cilium/cluster-config/<name>``): who the
    exporting cluster is; importers refuse a remote whose name or id clashes with theirs."""

    name: str
    id: int
    pod_cidrs: list[str]


@message("clustermesh-node", (1, 0))
@dataclass
class ClusterNode:
    """``nodes.<node>`` in the export (``cilium/state/nodes/v1/<cluster>/<node>``): a node's addresses,
    pod CIDRs and WireGuard public key (empty without encryption)."""

    cluster: str
    name: str
    ips: list[str]
    pod_cidrs: list[str]
    wireguard_public_key: str = ""


@message("clustermesh-service", (1, 1))
@dataclass
class ClusterService:
    """``services.<ns>.<name>`` in the export (``cilium/state/services/v1/<cluster>/<ns>/<name>``): a global
    Service's ready backends per port (key ``<port name>/<protocol>``, value ``[[ip, port], …]``); none when
    ``service.cilium.io/shared: "false"``. 1.1: ``cluster_id`` (Cilium's ClusterService.ClusterID), which the
    importing nodes write into each remote backend's ``cilium_lb4_backends_v3`` entry."""

    cluster: str
    namespace: str
    name: str
    shared: bool
    backends: dict[str, list[list[Any]]] = field(default_factory=dict)
    cluster_id: int = 0


@message("fqdn-cache", (1, 0))
@dataclass
class FqdnCacheRecord:
    """``<node>`` in ``PROPOLIS_FQDN_V1``: the node's dns-proxy cache (`fqdn.cache.CacheEntry` rows), which its
    datapath-writer compiles toFQDNs selectors against; a restarted dns-proxy restores it from here.
    ``generation`` grows with every change; the writer reports the one its maps reflect (progress
    ``fqdn_generation``) so the proxy releases an answer only once its IPs are allowed."""

    node: str
    generation: int
    entries: list[dict[str, Any]] = field(default_factory=list)
