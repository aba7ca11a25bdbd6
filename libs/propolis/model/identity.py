"""Security identities: reserved numbers, numeric ranges, and a pod's security labels.

Why: the identity-allocator derives labels and numbers here, the policy compiler
and the datapath-writer interpret them here; one module keeps them agreeing with
Cilium (`pkg/identity/numericidentity.go`, `pkg/labelsfilter`).
No I/O: allocation itself (compare-and-set on the bus) lives in propolis.identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from propolis.model.labels import SOURCE_K8S, SOURCE_RESERVED, Label, LabelSet
from propolis.model.types import NumericIdentity

# --- reserved identities (Cilium's numbers) ---------------------------------------------
IDENTITY_UNKNOWN = NumericIdentity(0)  # invalid as an identity; in policy maps: "any peer"
RESERVED_HOST = NumericIdentity(1)
RESERVED_WORLD = NumericIdentity(2)
RESERVED_UNMANAGED = NumericIdentity(3)
RESERVED_HEALTH = NumericIdentity(4)
RESERVED_INIT = NumericIdentity(5)
RESERVED_REMOTE_NODE = NumericIdentity(6)
RESERVED_KUBE_APISERVER = NumericIdentity(7)
RESERVED_INGRESS = NumericIdentity(8)
RESERVED_WORLD_IPV4 = NumericIdentity(9)
RESERVED_WORLD_IPV6 = NumericIdentity(10)
RESERVED_ENCRYPTED_OVERLAY = NumericIdentity(11)

RESERVED_NAMES: dict[int, str] = {
    RESERVED_HOST: "host", RESERVED_WORLD: "world", RESERVED_UNMANAGED: "unmanaged",
    RESERVED_HEALTH: "health", RESERVED_INIT: "init", RESERVED_REMOTE_NODE: "remote-node",
    RESERVED_KUBE_APISERVER: "kube-apiserver", RESERVED_INGRESS: "ingress",
    RESERVED_WORLD_IPV4: "world-ipv4", RESERVED_WORLD_IPV6: "world-ipv6",
}
RESERVED_BY_NAME: dict[str, NumericIdentity] = {
    name: NumericIdentity(number) for number, name in RESERVED_NAMES.items()}

# --- numeric ranges ------------------------------------------------------------------
MIN_USER_RESERVED = 128
MAX_USER_RESERVED = 255
MIN_CLUSTER_LOCAL = 256
MAX_CLUSTER_LOCAL = 65535
CLUSTER_ID_SHIFT = 16
MAX_CLUSTER_ID = 255
LOCAL_IDENTITY_FLAG = 1 << 24  # CIDR/FQDN identities: node-local, never on the wire
MIN_LOCAL_IDENTITY = LOCAL_IDENTITY_FLAG + 1
MAX_LOCAL_IDENTITY = (1 << 25) - 1

# --- well-known label keys -----------------------------------------------------------
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the apiserver


def reserved_labels(number: int) -> LabelSet:
    """The labels of a reserved identity (kube-apiserver also carries remote-node, as in Cilium)."""
    name = RESERVED_NAMES[number]
    labels = [Label(SOURCE_RESERVED, name)]
    if number == RESERVED_KUBE_APISERVER:
        labels.append(Label(SOURCE_RESERVED, "remote-node"))
    return LabelSet(labels)


def reserved_identity_labels() -> dict[NumericIdentity, list[str]]:
    """Every reserved identity -> its sorted label strings (what the allocator writes at start)."""
    return {NumericIdentity(number): reserved_labels(number).strings() for number in RESERVED_NAMES}


def cluster_identity(local: int, cluster_id: int = 0) -> NumericIdentity:
    """A cluster-local number (256..65535) placed in cluster ``cluster_id``'s range."""
    if not MIN_CLUSTER_LOCAL <= local <= MAX_CLUSTER_LOCAL:
        raise ValueError(f"cluster-local identity {local} outside {MIN_CLUSTER_LOCAL}..{MAX_CLUSTER_LOCAL}")
    if not 0 <= cluster_id <= MAX_CLUSTER_ID:
        raise ValueError(f"cluster id {cluster_id} outside 0..{MAX_CLUSTER_ID}")
    return NumericIdentity((cluster_id << CLUSTER_ID_SHIFT) | local)


def cluster_id_of(identity: int) -> int:
    return (identity >> CLUSTER_ID_SHIFT) & 0xFF


def is_reserved(identity: int) -> bool:
    return 0 < identity < MIN_CLUSTER_LOCAL


def is_local(identity: int) -> bool:
    """Node-local (CIDR/FQDN) identity."""
    return identity & LOCAL_IDENTITY_FLAG != 0


def is_cluster_identity(identity: int) -> bool:
    """An allocated endpoint identity of some cluster (not reserved, not node-local)."""
    return not is_local(identity) and (identity & 0xFFFF) >= MIN_CLUSTER_LOCAL


# --- which pod labels carry security meaning (Cilium's default label filter) ------------
@dataclass(frozen=True)
class LabelFilter:
    """Cilium's default identity-relevant label filter (docs: "Limiting Identity-Relevant Labels").

    A pod label is dropped when its key equals one of ``excluded_keys`` or its
    prefix (the part before ``/``) is one of ``excluded_domains`` or a subdomain
    of one — except ``kept_domains``. Keys starting with ``io.kubernetes`` are
    dropped (the pod namespace label is added separately). Namespace labels are
    never filtered: NetworkPolicy namespaceSelectors rely on them
    (``kubernetes.io/metadata.name``).
    """

    excluded_keys: frozenset[str] = frozenset({
        "pod-template-hash", "controller-revision-hash", "pod-template-generation",
        "controller-uid", "job-name", "etcd_node",
    })
    excluded_domains: tuple[str, ...] = ("kubernetes.io", "k8s.io")
    kept_domains: tuple[str, ...] = ("app.kubernetes.io",)
    excluded_patterns: tuple[str, ...] = (r"^io\.kubernetes", r"^annotation\.")
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.excluded_patterns))

    def relevant(self, key: str) -> bool:
        if key in self.excluded_keys:
            return False
        if any(p.search(key) for p in self._compiled):
            return False
        domain = key.split("/", 1)[0] if "/" in key else ""
        if domain:
            if any(domain == d or domain.endswith("." + d) for d in self.kept_domains):
                return True
            if any(domain == d or domain.endswith("." + d) for d in self.excluded_domains):
                return False
        return True


DEFAULT_LABEL_FILTER = LabelFilter()


def pod_security_labels(*, pod_labels: Mapping[str, str], namespace: str,
                        namespace_labels: Mapping[str, str] | None = None,
                        service_account: str | None = "default", cluster: str | None = None,
                        label_filter: LabelFilter = DEFAULT_LABEL_FILTER) -> LabelSet:
    """A pod's security labels as Cilium derives them.

    ``k8s:<key>=<value>`` per relevant pod label, ``k8s:io.kubernetes.pod.namespace=<ns>``,
    ``k8s:io.cilium.k8s.namespace.labels.<key>=<value>`` per namespace label (plus
    ``kubernetes.io/metadata.name`` if the namespace object lacks it),
    ``k8s:io.cilium.k8s.policy.serviceaccount=<sa>`` and ``k8s:io.cilium.k8s.policy.cluster=<name>``.
    """
    labels = [Label(SOURCE_K8S, k, str(v)) for k, v in pod_labels.items() if label_filter.relevant(k)]
    labels.append(Label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))
    ns_labels = dict(namespace_labels or {})
    ns_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)
    labels.extend(Label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, str(v)) for k, v in ns_labels.items())
    if service_account:
        labels.append(Label(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, service_account))
    if cluster:
        labels.append(Label(SOURCE_K8S, CLUSTER_LABEL, cluster))
    return LabelSet(labels)


def identity_labels(number: int, labels: Iterable[str] | LabelSet) -> LabelSet:
    """The LabelSet of an identity: reserved numbers always get Cilium's reserved labels."""
    if number in RESERVED_NAMES:
        return reserved_labels(number)
    return labels if isinstance(labels, LabelSet) else LabelSet.from_strings(labels)


def namespace_of(labels: LabelSet) -> str | None:
    found = labels.get(SOURCE_K8S, POD_NAMESPACE_LABEL)
    return found[0].value if found else None
