"""Nodes, underlay and pod namespaces of a sandbox, built with netlink sockets opened inside them.

A process in the root namespace acts on a node's (or pod's) namespace the way a
hostNetwork agent acts on its host: it opens a socket *inside* the namespace —
by switching the calling thread into it with setns(2), creating the socket, and
switching back — then uses that socket from anywhere. Sockets keep the
namespace they were created in, so `IPRoute` handles, probe sockets and
listeners are all made this way. setns(CLONE_NEWNET) only affects the calling
thread, so this is safe in threaded and asyncio programs as long as nothing
awaits between the switch and the switch back (`entered` is synchronous).

Nothing created here has a route out of the sandbox: the underlay bridge
namespace has no address, nodes only route pod CIDRs to each other.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from propolis.errors import PermanentError, TemporaryError

# Entering namespaces is the runtime's (agents do it too); re-exported for the sandbox's callers.
from propolis.runtime.netns import entered as entered
from propolis.runtime.netns import iproute_in as iproute_in
from propolis.runtime.netns import netns_path as netns_path
from propolis.runtime.netns import socket_in as socket_in
from propolis.runtime.netns import write_sysctl as write_sysctl
from propolis_sandbox.config import NETNS_DIR, SandboxConfig

UNDERLAY_BRIDGE = "br0"
#: Encrypted sandbox: the native pod-CIDR routes for node-originated traffic only (see `route_pod_cidrs`).
NODE_TRAFFIC_TABLE = 202
NODE_TRAFFIC_RULE_PRIORITY = 100
#: ... except what the node sends with a pod's address (the L7 proxy's upstream, IP_TRANSPARENT): pod traffic,
#: so it takes the main table's routes through cilium_wg0 like the pod's own packets.
POD_SOURCED_RULE_PRIORITY = 98
NODE_UPLINK = "eth0"


# --- namespace lifecycle ---------------------------------------------------------------------

def run(argv: list[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TemporaryError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create a named namespace (idempotent) with loopback up."""
    if not netns_exists(name):
        proc = run(["ip", "netns", "add", name], what=f"create namespace {name}", check=False)
        if proc.returncode != 0 and not netns_exists(name):
            raise TemporaryError(f"create namespace {name}: {proc.stderr.strip()}")
    with iproute_in(name) as ipr:
        ipr.link("set", index=1, state="up")


def resolv_conf_dir(name: str) -> Path:
    """`ip netns exec NAME` bind-mounts the files here over /etc: the namespace's own resolver configuration."""
    return Path("/etc/netns") / name


def write_resolv_conf(name: str, nameserver: str, search: list[str]) -> None:
    """The pod's /etc/resolv.conf as the kubelet writes it for dnsPolicy ClusterFirst (ndots 5)."""
    directory = resolv_conf_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(f"search {' '.join(search)}\nnameserver {nameserver}\noptions ndots:5\n")


def delete_netns(name: str) -> None:
    """Remove a named namespace (and its /etc/netns files); missing is success. Links inside go with it."""
    shutil.rmtree(resolv_conf_dir(name), ignore_errors=True)
    if not netns_exists(name):
        return
    proc = run(["ip", "netns", "delete", name], what=f"delete namespace {name}", check=False)
    if proc.returncode != 0 and netns_exists(name):
        raise TemporaryError(f"delete namespace {name}: {proc.stderr.strip()}")


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(netns_path(name)).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(names: list[str]) -> list[int]:
    """Processes whose network namespace is one of `names` (leftover pod servers, shells)."""
    inodes = {ino for ino in (netns_inode(n) for n in names) if ino is not None}
    found: list[int] = []
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def pids_with_env(var: str, value: str) -> list[int]:
    """Processes started with `var=value` in their environment (how `down` finds a dead sandbox's children)."""
    needle = f"{var}={value}".encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def terminate(pids: list[int], *, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL what is left. Only ever called with pids we identified as ours."""
    alive = []
    for pid in set(pids):
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap if it is our child
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# --- underlay and nodes ----------------------------------------------------------------------

def _ensure_link(ipr: IPRoute, **spec: object) -> None:
    try:
        ipr.link("add", **spec)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def build_underlay(cfg: SandboxConfig) -> None:
    """The underlay: a bridge in `pp-S-underlay`, one veth per node; node side is `eth0` in the node ns."""
    create_netns(cfg.underlay_netns)
    with iproute_in(cfg.underlay_netns) as ipr:
        _ensure_link(ipr, ifname=UNDERLAY_BRIDGE, kind="bridge")
        bridge = ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
        ipr.link("set", index=bridge, state="up")
    for n in range(1, cfg.nodes + 1):
        build_node(cfg, n)
    for n in range(1, cfg.nodes + 1):
        route_pod_cidrs(cfg, n)


def build_node(cfg: SandboxConfig, n: int) -> None:
    """Node namespace n: uplink with its InternalIP, forwarding on."""
    node_ns = cfg.node_netns(n)
    create_netns(node_ns)
    port = f"n{n}"
    node_fd = os.open(netns_path(node_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with iproute_in(cfg.underlay_netns) as ipr:
            if not ipr.link_lookup(ifname=port):
                ipr.link("add", ifname=port, kind="veth", peer={"ifname": NODE_UPLINK, "net_ns_fd": node_fd})
            idx = ipr.link_lookup(ifname=port)[0]
            bridge = ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
            ipr.link("set", index=idx, master=bridge, state="up")
    finally:
        os.close(node_fd)
    with iproute_in(node_ns) as ipr:
        idx = ipr.link_lookup(ifname=NODE_UPLINK)[0]
        prefix = cfg.underlay_network.prefixlen
        if not ipr.get_addr(index=idx, address=cfg.node_ip(n)):
            ipr.addr("add", index=idx, address=cfg.node_ip(n), prefixlen=prefix)
        ipr.link("set", index=idx, state="up")
    write_sysctl(node_ns, "net.ipv4.ip_forward", "1")
    write_sysctl(node_ns, "net.ipv4.conf.all.rp_filter", "0")
    write_sysctl(node_ns, "net.ipv4.conf.default.rp_filter", "0")


def route_pod_cidrs(cfg: SandboxConfig, n: int) -> None:
    """Native routing: on node n, every other node's podCIDR via that node's InternalIP.

    With encryption on, pod traffic finds no native route: the wireguard-keymgr routes every other node's podCIDR
    through `cilium_wg0` (main table), and until it has, cross-node pod traffic has no route (never cleartext).
    Only traffic the node itself originates keeps the native routes (table `NODE_TRAFFIC_TABLE`, rule `iif lo`):
    like Cilium without `encryption.nodeEncryption`, node-to-pod traffic is not encrypted. What the node sends
    from a pod's address (a transparent proxy's upstream) is pod traffic and is routed as such (main table)."""
    with iproute_in(cfg.node_netns(n)) as ipr:
        if cfg.encryption:
            pods = ipaddress.IPv4Network(cfg.cluster_cidr)
            for rule in (dict(iifname="lo", table=NODE_TRAFFIC_TABLE, priority=NODE_TRAFFIC_RULE_PRIORITY),
                         dict(iifname="lo", src=str(pods.network_address), src_len=pods.prefixlen, table=254,
                              priority=POD_SOURCED_RULE_PRIORITY)):
                try:
                    ipr.rule("add", **rule)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            for m in range(1, cfg.nodes + 1):
                if m != n:
                    ipr.route("replace", dst=cfg.pod_cidr(m), gateway=cfg.node_ip(m), table=NODE_TRAFFIC_TABLE)
            return
        for m in range(1, cfg.nodes + 1):
            if m != n:
                ipr.route("replace", dst=cfg.pod_cidr(m), gateway=cfg.node_ip(m))


# --- running things inside a namespace -------------------------------------------------------

def netns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """`ip netns exec` also gives the command the namespace's /sys, as a container runtime would."""
    if not netns_exists(netns):
        raise PermanentError(f"network namespace {netns} does not exist")
    return ["ip", "netns", "exec", netns, *argv]
