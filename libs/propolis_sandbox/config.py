"""Names, address plan and state file of one sandbox — the only place that spells them.

Every namespace, link, socket, pin directory and address a sandbox creates is
derived here from the sandbox name and its index, so `up`, `down`, the kubelet,
the CNI config and the tests agree, and `down` can find leftovers of a crashed
sandbox by name alone (see docs/architecture.md "Sandbox conventions").
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from propolis.errors import PermanentError, ValidationError
from propolis.runtime.netns import NETNS_DIR as NETNS_DIR  # the runtime's, re-exported for the sandbox

if TYPE_CHECKING:
    from propolis.bus.connection import Bus

RUN_ROOT = Path(os.environ.get("PROPOLIS_RUN_ROOT", "/run/propolis"))
BPF_ROOT = Path("/sys/fs/bpf/propolis")
DEFAULT_NAME = "propolis"
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
#: Underlay: node n of the sandbox with index i has InternalIP 172.30.i.n/24.
UNDERLAY_SUPERNET = ipaddress.IPv4Network("172.30.0.0/16")
#: The pod's default gateway: a link-local address answered by proxy-ARP on the lxc (Calico/Cilium style).
POD_GATEWAY = "169.254.1.1"
#: Environment variable set on every process a sandbox starts: `down` finds leftovers by it.
SANDBOX_ENV = "PROPOLIS_SANDBOX"
#: ... and the pod's uid on every process of a pod (its workload, what `pods/exec` runs): a hostNetwork pod has
#: no namespace of its own, so its teardown finds its processes by this, not by the node's namespace.
POD_UID_ENV = "PROPOLIS_POD_UID"
MAX_NODES = 250
NETNS_PREFIX = "pp-"
#: `sandbox up --encryption`: "" = off; IPsec is absent (this kernel has no ESP to test it with).
ENCRYPTION_TYPES = ("", "wireguard")

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def validate_sandbox_name(name: str) -> str:
    """A short DNS label: it prefixes namespaces (`pp-<name>-…`) and node names (`<name>-worker`)."""
    if not _NAME_RE.match(name):
        raise ValidationError("name", f"invalid sandbox name {name!r}: lowercase letters, digits and '-', "
                                      "1-20 characters, starting and ending with a letter or digit")
    return name


def short_hash(*parts: str, length: int = 11) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


@dataclass
class SandboxConfig:
    """What `up` decided for a sandbox: persisted in state.json so every later command agrees."""

    name: str = DEFAULT_NAME
    nodes: int = 2
    index: int = 1
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    service_cidr: str = DEFAULT_SERVICE_CIDR
    #: transparent encryption between nodes: "" (off) or "wireguard" (`sandbox up --encryption wireguard`)
    encryption: str = ""
    #: encryption.strictMode on the cluster CIDR (`sandbox up --encryption wireguard --encryption-strict-mode`)
    encryption_strict_mode: bool = False
    #: encryption.nodeEncryption: node-to-node traffic through the tunnel too (`--node-encryption`)
    encryption_node_encryption: bool = False
    #: Cluster Mesh `cluster.id` 1-255 (`sandbox up --cluster-id`); 0 = no Cluster Mesh (the cluster name is the
    #: sandbox name). With an id the sandbox runs the clustermesh-apiserver and its identities carry the id.
    cluster_id: int = 0
    #: nats-server processes, and replicas of every KV bucket: 1, or a JetStream cluster of 3 or 5 on loopback
    #: (`sandbox up --nats-replicas 3`, as the chart's nats.replicas)
    nats_replicas: int = 1
    #: relays (`sandbox up --nats-relays N`, as the chart's nats.relays): leafnode servers holding mirrors of the
    #: buckets, node n's services connected to relay (n - 1) % N + 1 (`nats_relays.py`); 0 = none
    nats_relays: int = 0

    def __post_init__(self) -> None:
        validate_sandbox_name(self.name)
        if not 0 <= self.cluster_id <= 255:
            raise ValidationError("cluster_id", f"must be 1-255 (0 = no Cluster Mesh), got {self.cluster_id}")
        if self.nats_replicas not in (1, 3, 5):
            raise ValidationError("nats_replicas", f"must be 1, 3 or 5 (a JetStream quorum), got {self.nats_replicas}")
        if not 0 <= self.nats_relays <= self.nodes:
            raise ValidationError("nats_relays", f"must be 0-{self.nodes} (at most one per node), got {self.nats_relays}")
        if self.encryption not in ENCRYPTION_TYPES:
            raise ValidationError("encryption", f"must be one of {', '.join(t or '(none)' for t in ENCRYPTION_TYPES)}, "
                                                f"got {self.encryption!r}")
        for option in ("encryption_strict_mode", "encryption_node_encryption"):
            if getattr(self, option) and not self.encryption:
                raise ValidationError(option, "needs transparent encryption on (--encryption wireguard)")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValidationError("nodes", f"must be between 1 and {MAX_NODES}, got {self.nodes}")
        if not 1 <= self.index <= 254:
            raise ValidationError("index", f"sandbox index must be 1..254, got {self.index}")
        for fname in ("cluster_cidr", "service_cidr"):
            try:
                net = ipaddress.IPv4Network(getattr(self, fname))
            except ValueError as exc:
                raise ValidationError(fname, f"not an IPv4 CIDR: {exc}") from exc
            if fname == "cluster_cidr" and net.prefixlen > 24 - max(1, (self.nodes).bit_length()):
                raise ValidationError(fname, f"{net} is too small for {self.nodes} node /24s")
        if ipaddress.IPv4Network(self.cluster_cidr).overlaps(ipaddress.IPv4Network(self.service_cidr)):
            raise ValidationError("service_cidr", f"{self.service_cidr} overlaps cluster CIDR {self.cluster_cidr}")

    # --- directories and files --------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def nats_dir(self) -> Path:
        return self.run_dir / "nats"

    @property
    def nats_credentials(self) -> Path:
        """Every NATS user's password (admin, one per service and node): root-only, 0600."""
        return self.nats_dir / "credentials.json"

    @property
    def ipam_dir(self) -> Path:
        return self.run_dir / "ipam"

    @property
    def cni_conf_dir(self) -> Path:
        return self.run_dir / "cni"

    def node_dir(self, node: str) -> Path:
        return self.run_dir / node

    def datapath_socket(self, node: str) -> Path:
        return self.node_dir(node) / "datapath.sock"

    def pin_dir(self, node: str) -> Path:
        return BPF_ROOT / node

    # --- nodes -------------------------------------------------------------------------
    def node_name(self, n: int) -> str:
        """kind's worker names: S-worker, S-worker2, …"""
        return f"{self.name}-worker" + ("" if n == 1 else str(n))

    def node_names(self) -> list[str]:
        return [self.node_name(n) for n in range(1, self.nodes + 1)]

    def node_number(self, node: str) -> int:
        for n in range(1, self.nodes + 1):
            if self.node_name(n) == node:
                return n
        raise ValidationError("node", f"{node!r} is not a node of sandbox {self.name}")

    def node_netns(self, n: int) -> str:
        return f"{NETNS_PREFIX}{self.name}-{n}"

    @property
    def underlay_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}-underlay"

    @property
    def underlay_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"172.30.{self.index}.0/24")

    def node_ip(self, n: int) -> str:
        return str(self.underlay_network.network_address + n)

    @property
    def cluster_dns_ip(self) -> str:
        """The kube-dns Service's ClusterIP: the service CIDR's 10th address, as kubeadm and kind pick it."""
        return str(ipaddress.IPv4Network(self.service_cidr).network_address + 10)

    @staticmethod
    def dns_search(namespace: str) -> list[str]:
        """A pod's resolver search list (the kubelet's ClusterFirst policy)."""
        return [f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]

    @property
    def world_netns(self) -> str:
        """The outside world (`sandbox/world.py`): test hosts and the authoritative DNS beyond the cluster."""
        return f"{NETNS_PREFIX}{self.name}-world"

    @property
    def world_gateway_ip(self) -> str:
        """The world's address on the underlay (the nodes' route to it): .254, above every node's."""
        return str(self.underlay_network.network_address + 254)

    def pod_cidr(self, n: int) -> str:
        """The n-th /24 of the cluster CIDR (10.244.n.0/24 with the default)."""
        cluster = ipaddress.IPv4Network(self.cluster_cidr)
        return str(list(cluster.subnets(new_prefix=24))[n]) if cluster.prefixlen < 24 else str(cluster)

    def pod_netns_of(self, pod: dict[str, Any]) -> str:
        """The network namespace a pod's processes run in: its node's for `spec.hostNetwork` (no pod namespace
        is made for it, as a runtime makes no sandbox netns), else its own."""
        spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
        if spec.get("hostNetwork"):
            return self.node_netns(self.node_number(spec.get("nodeName") or ""))
        return self.pod_netns(meta.get("namespace") or "default", meta.get("name") or "")

    def pod_netns(self, namespace: str, pod: str) -> str:
        """`pp-S-<podns>-<pod>`, hashed when the name would get unwieldy (keeps /run/netns readable)."""
        plain = f"{NETNS_PREFIX}{self.name}-{namespace}-{pod}"
        if len(plain) <= 60:
            return plain
        return f"{NETNS_PREFIX}{self.name}-{namespace[:12]}-{pod[:20]}-{short_hash(namespace, pod, length=10)}"

    def owns_netns(self, netns: str) -> bool:
        """True for the names this sandbox may have created (leftover detection by prefix)."""
        return netns.startswith(f"{NETNS_PREFIX}{self.name}-")

    def owns_pin_dir(self, node_dir_name: str) -> bool:
        return re.fullmatch(re.escape(self.name) + r"-worker\d*", node_dir_name) is not None

    @property
    def clustermesh_dir(self) -> Path:
        """One file per connected remote cluster (`clustermesh.remotes`), read by the clustermesh-apiserver."""
        return self.run_dir / "clustermesh"

    def cni_network_name(self) -> str:
        return f"propolis-{self.name}"


@dataclass
class ServiceState:
    """One supervised process as recorded in state.json."""

    name: str
    scope: str  # "cluster" | "node"
    node: str
    pid: int
    argv: list[str]
    log: str


@dataclass
class SandboxState:
    """`/run/propolis/S/state.json`: everything another process needs to talk to the sandbox."""

    config: dict[str, Any]
    status: str = "starting"  # starting | ready | stopping | failed
    error: str = ""
    supervisor_pid: int = 0
    nats_url: str = ""
    nats_pid: int = 0  # the first server's (all of them: nats_servers)
    nats_servers: list[dict[str, Any]] = field(default_factory=list)  # {url, pid, dir} per nats-server
    nats_relays: list[dict[str, Any]] = field(default_factory=list)  # {url, pid, dir} per relay (nats_relays.py)
    apiserver_url: str = ""
    apiserver_pid: int = 0
    kubeconfig: str = ""
    nats_credentials: str = ""  # path of the credentials file (permissions.save_credentials), root-only
    nodes: list[dict[str, Any]] = field(default_factory=list)  # {name, netns, internal_ip, pod_cidr, pin_dir, datapath_socket}
    services: list[dict[str, Any]] = field(default_factory=list)  # ServiceState as dicts
    started_at: float = 0.0

    def sandbox(self) -> SandboxConfig:
        return SandboxConfig(**self.config)

    def admin_bus(self, name: str) -> Bus:
        """A (not yet connected) bus to this sandbox's NATS as its admin user: the supervisor, the CLI
        and tests; services connect as their own users. Reading the credentials needs root."""
        from propolis.bus.connection import Bus
        from propolis.bus.permissions import load_credentials
        try:
            admin, _ = load_credentials(self.nats_credentials)
        except (OSError, ValueError, KeyError) as exc:
            raise PermanentError(f"NATS credentials of sandbox {self.config.get('name')!r} unreadable "
                                 f"({self.nats_credentials or 'not recorded in state.json'}): {exc}") from exc
        return Bus(self.nats_url, name=name, user=admin.user, password=admin.password)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SandboxState:
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def load_state(name: str) -> SandboxState | None:
    path = RUN_ROOT / name / "state.json"
    try:
        return SandboxState.load(path)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def existing_sandboxes() -> dict[str, SandboxState]:
    """Every sandbox with a readable state file under the run root."""
    found: dict[str, SandboxState] = {}
    if RUN_ROOT.is_dir():
        for entry in sorted(RUN_ROOT.iterdir()):
            if entry.is_dir():
                state = load_state(entry.name)
                if state is not None:
                    found[entry.name] = state
    return found


@contextmanager
def allocation_lock() -> Iterator[None]:
    """Serialize index and CIDR allocation between concurrent `up`s on this machine."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / ".allocation.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def allocate(name: str, nodes: int, cluster_cidr: str | None, service_cidr: str | None) -> SandboxConfig:
    """Pick a free sandbox index and (unless given) a free cluster CIDR; refuse a clash.

    Call under `allocation_lock()`. An explicitly requested cluster CIDR that
    overlaps another sandbox's is an error naming that sandbox; without one,
    the first free /16 from 10.244.0.0/16 upwards is taken, so sandboxes with
    default settings coexist.
    """
    others = {n: s.sandbox() for n, s in existing_sandboxes().items() if n != name}
    used_index = {o.index for o in others.values()}
    index = next((i for i in range(1, 255) if i not in used_index), None)
    if index is None:
        raise ValidationError("name", "no free sandbox index (254 sandboxes exist)")
    if cluster_cidr is not None:
        try:
            wanted = ipaddress.IPv4Network(cluster_cidr)
        except ValueError as exc:
            raise ValidationError("cluster_cidr", f"not an IPv4 CIDR: {exc}") from exc
        for other_name, other in others.items():
            if wanted.overlaps(ipaddress.IPv4Network(other.cluster_cidr)):
                raise ValidationError("cluster_cidr", f"{wanted} clashes with sandbox {other_name!r}'s cluster "
                                                      f"CIDR {other.cluster_cidr}; pick another --cluster-cidr")
        chosen = str(wanted)
    else:
        taken = [ipaddress.IPv4Network(o.cluster_cidr) for o in others.values()]
        chosen = ""
        for second in range(244, 256):
            candidate = ipaddress.IPv4Network(f"10.{second}.0.0/16")
            if not any(candidate.overlaps(t) for t in taken):
                chosen = str(candidate)
                break
        if not chosen:
            raise ValidationError("cluster_cidr", "no free default cluster CIDR in 10.244-255.0.0/16; give --cluster-cidr")
    return SandboxConfig(name=name, nodes=nodes, index=index, cluster_cidr=chosen,
                         service_cidr=service_cidr or DEFAULT_SERVICE_CIDR)


def validate_dns_label(value: str, field_name: str) -> None:
    if not isinstance(value, str) or not _DNS_LABEL_RE.match(value):
        raise ValidationError(field_name, f"invalid name {value!r}: must be a DNS-1123 label "
                                          "(lowercase alphanumerics and '-', at most 63 characters)")
