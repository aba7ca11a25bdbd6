"""`propolis clustermesh connect|disconnect` between two sandboxes on this machine.

Like VPC peering between two clouds' networks: a veth joins the two underlay bridges (one L2 segment,
nothing leaves the sandboxes' namespaces), every node gets a link route to the other underlay and a
route for each remote node's pod CIDR via that node's InternalIP (native routing). Each side then gets
the other's remote config (`clustermesh/remotes.py`): its NATS URL and the read-only
`clustermesh-remote` user, whose password only the remote's credentials file holds.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import subprocess
from collections.abc import Callable

from pyroute2.netlink.exceptions import NetlinkError

from propolis.bus import subjects
from propolis.bus.permissions import load_credentials
from propolis.clustermesh.remotes import RemoteCluster, remove_remote, save_remote
from propolis.errors import ValidationError
from propolis_sandbox import netns
from propolis_sandbox.config import SandboxConfig, SandboxState

try:  # the world's masquerade (ip-masq-agent's rule) exists only where the sandbox has a world namespace
    from propolis_sandbox.world import MASQ_CHAIN
except ImportError:  # pragma: no cover - a tree without it masquerades nothing
    MASQ_CHAIN = ""


def peering_link(cfg: SandboxConfig, other: SandboxConfig) -> str:
    """The veth end in `cfg`'s underlay namespace that leads to `other`'s underlay."""
    return f"cm{other.index}"


def check_pair(local: SandboxState, remote: SandboxState) -> tuple[SandboxConfig, SandboxConfig]:
    """Both sandboxes run Cluster Mesh and can be connected: distinct names, ids and pod CIDRs."""
    a, b = local.sandbox(), remote.sandbox()
    for cfg in (a, b):
        if not cfg.cluster_id:
            raise ValidationError("cluster.id", f"cluster {cfg.name!r} has no cluster id: start it with "
                                                f"`propolis sandbox up --name {cfg.name} --cluster-id N` (1-255)")
    if a.name == b.name:
        raise ValidationError("destination", f"cluster {a.name!r} cannot connect to itself")
    if a.cluster_id == b.cluster_id:
        raise ValidationError("cluster.id", f"clusters {a.name!r} and {b.name!r} have the same cluster id "
                                            f"{a.cluster_id}; each cluster of a mesh needs a unique id")
    if ipaddress.IPv4Network(a.cluster_cidr).overlaps(ipaddress.IPv4Network(b.cluster_cidr)):
        raise ValidationError("cluster_cidr", f"clusters {a.name!r} ({a.cluster_cidr}) and {b.name!r} "
                              f"({b.cluster_cidr}) have overlapping pod CIDRs")
    for cfg in (a, b):
        if cfg.encryption:
            raise ValidationError("encryption", f"cluster {cfg.name!r} runs WireGuard; Cluster Mesh across "
                                                "encrypted sandboxes is not built yet")
    return a, b


def _ignore(code: int, fn: Callable[..., object], *args: object, **kw: object) -> None:
    """Call `fn`, treating netlink error `code` (already gone, no such device) as done."""
    try:
        fn(*args, **kw)
    except NetlinkError as exc:
        if exc.code != code:
            raise


def peer_underlays(a: SandboxConfig, b: SandboxConfig) -> None:
    """The veth between the two underlay bridges, then each side's routes to the other."""
    b_fd = os.open(netns.netns_path(b.underlay_netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.iproute_in(a.underlay_netns) as ipr:
            if not ipr.link_lookup(ifname=peering_link(a, b)):
                ipr.link("add", ifname=peering_link(a, b), kind="veth",
                         peer={"ifname": peering_link(b, a), "net_ns_fd": b_fd})
    finally:
        os.close(b_fd)
    for cfg in (a, b):
        with netns.iproute_in(cfg.underlay_netns) as ipr:
            idx = ipr.link_lookup(ifname=peering_link(cfg, b if cfg is a else a))[0]
            bridge = ipr.link_lookup(ifname=netns.UNDERLAY_BRIDGE)[0]
            ipr.link("set", index=idx, master=bridge, state="up")
    route_remote(a, b)
    route_remote(b, a)


def route_remote(cfg: SandboxConfig, other: SandboxConfig, *, remove: bool = False) -> None:
    """On every node of `cfg`: the other underlay on-link, each remote pod CIDR via its node."""
    for n in range(1, cfg.nodes + 1):
        with netns.iproute_in(cfg.node_netns(n)) as ipr:
            uplink = ipr.link_lookup(ifname=netns.NODE_UPLINK)[0]
            routes = [dict(dst=str(other.underlay_network), oif=uplink, scope=253)]
            routes += [dict(dst=other.pod_cidr(m), gateway=other.node_ip(m))
                       for m in range(1, other.nodes + 1)]
            if remove:
                for route in reversed(routes):
                    _ignore(errno.ESRCH, ipr.route, "del", **route)
            else:
                for route in routes:
                    ipr.route("replace", **route)
        unmasqueraded(cfg.node_netns(n), other.cluster_cidr, remove=remove)


def unmasqueraded(node_ns: str, cidr: str, *, remove: bool = False) -> None:
    """Pod traffic to the other cluster keeps its source address (Cilium: ipv4NativeRoutingCIDR covers every
    cluster of the mesh), or the remote would see the node's address instead of the pod's identity."""
    if not MASQ_CHAIN:
        return
    rule = [MASQ_CHAIN, "-d", cidr, "-j", "RETURN"]
    iptables = ["ip", "netns", "exec", node_ns, "iptables", "-t", "nat"]
    if subprocess.run([*iptables, "-S", MASQ_CHAIN], capture_output=True).returncode != 0:
        return  # no masquerade on this node
    present = subprocess.run([*iptables, "-C", *rule], capture_output=True).returncode == 0
    if present == remove:
        subprocess.run([*iptables, "-D" if remove else "-I", *rule], capture_output=True, check=not remove)


def remote_config(state: SandboxState) -> RemoteCluster:
    """What the other side needs to read `state`'s export: its NATS and the read-only user."""
    cfg = state.sandbox()
    _, users = load_credentials(state.nats_credentials)
    reader = users.get(subjects.CLUSTERMESH_REMOTE_USER)
    if reader is None:
        raise ValidationError("clustermesh", f"cluster {cfg.name!r} has no {subjects.CLUSTERMESH_REMOTE_USER} "
                                             "user (its clustermesh-apiserver does not run)")
    return RemoteCluster(cfg.name, cfg.cluster_id, state.nats_url, reader.user, reader.password)


def connect(local: SandboxState, remote: SandboxState) -> None:
    """Both directions, as `cilium clustermesh connect` does."""
    a, b = check_pair(local, remote)
    a_remote, b_remote = remote_config(local), remote_config(remote)
    peer_underlays(a, b)
    save_remote(a.clustermesh_dir, b_remote)
    save_remote(b.clustermesh_dir, a_remote)


def disconnect(local: SandboxState, remote: SandboxState | None, remote_name: str) -> None:
    """Withdraw at once on both sides: remote configs, routes, the peering veth. `remote` may be gone."""
    a = local.sandbox()
    remove_remote(a.clustermesh_dir, remote_name)
    if remote is None:
        return
    b = remote.sandbox()
    remove_remote(b.clustermesh_dir, a.name)
    for cfg, other in ((a, b), (b, a)):
        try:
            route_remote(cfg, other, remove=True)
        except Exception:  # noqa: BLE001 - a node namespace already gone has no routes left
            pass
    with netns.iproute_in(a.underlay_netns) as ipr:
        idx = ipr.link_lookup(ifname=peering_link(a, b))
        if idx:
            _ignore(errno.ENODEV, ipr.link, "del", index=idx[0])
