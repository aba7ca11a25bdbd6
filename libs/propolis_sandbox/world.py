"""The sandbox's outside world: a namespace beyond the cluster, reached through the underlay like the internet.

Why: toFQDNs, `world` entities and cluster DNS need real outside hosts and a real
authoritative DNS to mean anything, and nothing may leave the machine. So each
sandbox gets `pp-S-world`: a port on the underlay bridge (its gateway address
`172.30.<i>.254`), test hosts on the documentation ranges (RFC 5737
198.51.100.0/24 and 203.0.113.0/24) answering TCP, UDP and HTTP with the echo
server, and an authoritative DNS for the test zones (`world_dns.py`). Nodes route
only those ranges to it and masquerade pod egress to non-cluster addresses through
their own InternalIP, as a cloud node's NAT does; the world has no route to pod
CIDRs, so an unmasqueraded packet would get no answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from propolis.errors import TemporaryError
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import SandboxConfig

#: The address ranges the world serves (RFC 5737): the only ones the nodes route to it.
WORLD_RANGES = ("198.51.100.0/24", "203.0.113.0/24")
#: The world's authoritative DNS server (UDP and TCP 53), kube-dns's upstream.
WORLD_DNS_IP = "198.51.100.53"
#: A plain world host for probes and the connectivity suite (`world:203.0.113.10`).
WORLD_HOST_IP = "203.0.113.10"
#: Ports every world host answers on with the echo server (TCP lines/HTTP; UDP datagrams).
WORLD_TCP_PORTS = (80, 443, 8080)
WORLD_UDP_PORTS = (8080,)
WORLD_UPLINK = "eth0"
WORLD_PORT = "world"  # its port on the underlay bridge
MASQ_CHAIN = "PROPOLIS-MASQ"


@dataclass(frozen=True)
class ZoneRecord:
    """A name's A records. `rotate`: each answer carries the next single address of `addresses`."""

    addresses: tuple[str, ...]
    ttl: int = 60
    rotate: bool = False


WORLD_ZONE: dict[str, ZoneRecord] = {
    "s3.amazonaws.com.": ZoneRecord(("203.0.113.20", "203.0.113.21"), ttl=60),
    "ec2.us-east-1.amazonaws.com.": ZoneRecord(("203.0.113.22", "203.0.113.23"), ttl=60),
    "sqs.eu-west-1.amazonaws.com.": ZoneRecord(("203.0.113.24", "203.0.113.25", "203.0.113.26"), ttl=30),
    "dynamodb.us-east-1.amazonaws.com.": ZoneRecord(("203.0.113.27",), ttl=300),
    "api.stripe.com.": ZoneRecord(("203.0.113.30", "203.0.113.31"), ttl=300),
    "example.org.": ZoneRecord(("198.51.100.80",), ttl=3600),
    "www.example.org.": ZoneRecord(("198.51.100.81",), ttl=3600),
    "rotating.example.net.": ZoneRecord(tuple(f"203.0.113.{i}" for i in range(40, 48)), ttl=5, rotate=True),
    "short-ttl.example.net.": ZoneRecord(("203.0.113.50",), ttl=1),
    "long-ttl.example.net.": ZoneRecord(("203.0.113.51",), ttl=86400),
    "host.world.test.": ZoneRecord(("203.0.113.10",), ttl=60),
}


def host_addresses() -> list[str]:
    """Every world address: the zones' A records, the DNS server and the plain host (all on the world's loopback)."""
    addrs = {WORLD_DNS_IP, WORLD_HOST_IP}
    for record in WORLD_ZONE.values():
        addrs.update(record.addresses)
    return sorted(addrs)


def build_world(cfg: SandboxConfig) -> None:
    """The world namespace on the underlay, its host addresses, and every node's route and masquerade to it."""
    world_ns = cfg.world_netns
    netns_mod.create_netns(world_ns)
    world_fd = os.open(netns_mod.netns_path(world_ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns_mod.iproute_in(cfg.underlay_netns) as ipr:
            if not ipr.link_lookup(ifname=WORLD_PORT):
                ipr.link("add", ifname=WORLD_PORT, kind="veth", peer={"ifname": WORLD_UPLINK, "net_ns_fd": world_fd})
            idx = ipr.link_lookup(ifname=WORLD_PORT)[0]
            bridge = ipr.link_lookup(ifname=netns_mod.UNDERLAY_BRIDGE)[0]
            ipr.link("set", index=idx, master=bridge, state="up")
    finally:
        os.close(world_fd)
    with netns_mod.iproute_in(world_ns) as ipr:
        uplink = ipr.link_lookup(ifname=WORLD_UPLINK)[0]
        if not ipr.get_addr(index=uplink, address=cfg.world_gateway_ip):
            ipr.addr("add", index=uplink, address=cfg.world_gateway_ip, prefixlen=cfg.underlay_network.prefixlen)
        ipr.link("set", index=uplink, state="up")
        hosts = ipr.link_lookup(ifname="lo")[0]  # no dummy links in every kernel: loopback holds the hosts
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=hosts)}
        for addr in host_addresses():
            if addr not in present:
                ipr.addr("add", index=hosts, address=addr, prefixlen=32)
        ipr.link("set", index=hosts, state="up")
    for n in range(1, cfg.nodes + 1):
        connect_node(cfg, n)


def connect_node(cfg: SandboxConfig, n: int) -> None:
    """Node n routes the world ranges to the world's gateway and masquerades pod egress that leaves the cluster
    (ip-masq-agent's rule: not to the cluster CIDR, not to the underlay) through its InternalIP."""
    node_ns = cfg.node_netns(n)
    with netns_mod.iproute_in(node_ns) as ipr:
        for dst in WORLD_RANGES:
            ipr.route("replace", dst=dst, gateway=cfg.world_gateway_ip)
    rules = (f"*nat\n:{MASQ_CHAIN} - [0:0]\n"
             f"-A POSTROUTING -s {cfg.cluster_cidr} -o {netns_mod.NODE_UPLINK} -j {MASQ_CHAIN}\n"
             f"-A {MASQ_CHAIN} -d {cfg.cluster_cidr} -j RETURN\n"
             f"-A {MASQ_CHAIN} -d {cfg.underlay_network} -j RETURN\n"
             f"-A {MASQ_CHAIN} -j MASQUERADE\nCOMMIT\n")
    proc = subprocess.run(["ip", "netns", "exec", node_ns, "iptables-restore", "--noflush"], input=rules,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TemporaryError(f"masquerade rules on {node_ns}: iptables-restore exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")


def world_processes(cfg: SandboxConfig) -> list[tuple[str, list[str]]]:
    """(name, argv) of the world's servers, run inside its namespace and supervised like the API server."""
    echo = [sys.executable, "-m", "propolis_sandbox.echo", "--pod", "world"]
    echo += [a for addr in host_addresses() if addr != WORLD_DNS_IP for a in ("--address", addr)]
    echo += [a for p in WORLD_TCP_PORTS for a in ("--tcp", str(p))] + [a for p in WORLD_UDP_PORTS for a in ("--udp", str(p))]
    dns = [sys.executable, "-m", "propolis_sandbox.world_dns", "--listen", WORLD_DNS_IP]
    return [("world-hosts", netns_mod.netns_exec_argv(cfg.world_netns, echo)),
            ("world-dns", netns_mod.netns_exec_argv(cfg.world_netns, dns))]
