"""The sandbox's cluster DNS: the workload of the `kube-system` kube-dns pod (what CoreDNS is on kind).

Answers `<svc>.<ns>.svc.cluster.local` (the ClusterIP) and `<a-b-c-d>.<ns>.pod.cluster.local` (a pod
of that namespace with that IP, CoreDNS's `pods verified`) from the API, NXDOMAIN for
other names under `cluster.local`, and forwards everything else to the world's DNS.

Why it runs in the root namespace with its sockets in the pod's: the sandbox API
server listens on the root namespace's loopback, which no pod reaches, so the
process reads the API from the root namespace (as CoreDNS reads it through the
`kubernetes` Service) while its DNS listeners and every upstream query live in the
pod's namespace: queries reach it through the kube-dns Service like on a cluster,
and its forwarding goes through its own endpoint's datapath and the node's NAT.
The kubelet starts it for pods of the CoreDNS image (`kubelet.WORKLOAD_IMAGES`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import socket
import sys
from typing import Any

import aiohttp
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from propolis_sandbox import netns as netns_mod
from propolis_sandbox.dns_server import DnsServer, bound_sockets

log = logging.getLogger("propolis_sandbox.kube_dns")

CLUSTER_DOMAIN = "cluster.local"
CLUSTER_TTL = 5  # CoreDNS's kubernetes plugin default
UPSTREAM_TIMEOUT_S = 2.0
WATCH_TIMEOUT_S = 60


class ClusterRecords:
    """Service ClusterIPs and pod IPs by namespace, kept current by list+watch of the API."""

    def __init__(self, apiserver: str) -> None:
        self.apiserver = apiserver.rstrip("/")
        self.services: dict[tuple[str, str], str] = {}  # (ns, name) -> ClusterIP
        self.pods: dict[tuple[str, str], str] = {}  # (ns, name) -> pod IP
        self.synced = {"services": asyncio.Event(), "pods": asyncio.Event()}

    def _apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        table = self.services if kind == "services" else self.pods
        value = (obj.get("spec", {}).get("clusterIP", "") if kind == "services"
                 else obj.get("status", {}).get("podIP", ""))
        if event == "DELETED" or not value or value == "None":
            table.pop(key, None)
        else:
            table[key] = value

    async def follow(self, kind: str) -> None:
        """List, then watch from the list's revision; any error or 410 relists."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 10)) as http:
            while True:
                try:
                    async with http.get(f"{self.apiserver}/api/v1/{kind}") as resp:
                        body = await resp.json()
                    table = self.services if kind == "services" else self.pods
                    table.clear()
                    for obj in body.get("items", []):
                        self._apply(kind, "ADDED", obj)
                    self.synced[kind].set()
                    rv = body.get("metadata", {}).get("resourceVersion", "")
                    params = {"watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true",
                              "timeoutSeconds": str(WATCH_TIMEOUT_S)}
                    async with http.get(f"{self.apiserver}/api/v1/{kind}", params=params) as resp:
                        async for line in resp.content:
                            event = json.loads(line)
                            if event.get("type") == "ERROR":
                                break
                            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                                self._apply(kind, event["type"], event.get("object", {}))
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    log.warning("watching %s: %s; relisting", kind, exc)
                    await asyncio.sleep(0.5)

    def lookup(self, name: str) -> tuple[bool, list[str]]:
        """(in the cluster domain, addresses) for an absolute lower-case name without the trailing dot."""
        suffix = "." + CLUSTER_DOMAIN
        if not (name == CLUSTER_DOMAIN or name.endswith(suffix)):
            return False, []
        labels = name[: -len(suffix)].split(".") if name != CLUSTER_DOMAIN else []
        if len(labels) == 3 and labels[2] == "svc":
            ip = self.services.get((labels[1], labels[0]))
            return True, [ip] if ip else []
        if len(labels) == 3 and labels[2] == "pod":
            ip = labels[0].replace("-", ".")
            found = any(ns == labels[1] and pod_ip == ip for (ns, _), pod_ip in self.pods.items())
            return True, [ip] if found else []
        return True, []


class KubeDns:
    """Answers cluster names itself, forwards the rest to `upstream` from the pod's namespace."""

    def __init__(self, records: ClusterRecords, upstream: str, netns: str) -> None:
        self.records = records
        self.upstream = upstream
        self.netns = netns

    async def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        in_cluster, addrs = self.records.lookup(name)
        if not in_cluster:
            return await self.forward(query)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not addrs:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            response.answer.append(dns.rrset.from_text_list(question.name, CLUSTER_TTL, dns.rdataclass.IN,
                                                            dns.rdatatype.A, addrs))
        return response

    async def forward(self, query: dns.message.Message) -> dns.message.Message | None:
        sock = netns_mod.socket_in(self.netns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            return await asyncio.to_thread(self._forward_blocking, query, sock)
        except (dns.exception.DNSException, OSError) as exc:
            log.info("forwarding %s to %s: %s", query.question[0].name, self.upstream, exc)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        finally:
            sock.close()

    def _forward_blocking(self, query: dns.message.Message, sock: socket.socket) -> dns.message.Message:
        sock.setblocking(True)
        response = dns.query.udp(query, self.upstream, timeout=UPSTREAM_TIMEOUT_S, sock=sock)
        if response.flags & dns.flags.TC:
            with netns_mod.entered(self.netns):
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with tcp:
                tcp.settimeout(UPSTREAM_TIMEOUT_S)
                tcp.connect((self.upstream, 53))
                response = dns.query.tcp(query, self.upstream, timeout=UPSTREAM_TIMEOUT_S, sock=tcp)
        return response


def listening_sockets(netns: str, port: int = 53) -> tuple[socket.socket, socket.socket]:
    with netns_mod.entered(netns):
        return bound_sockets("0.0.0.0", port)


async def serve(args: argparse.Namespace) -> None:
    records = ClusterRecords(args.apiserver)
    tasks = [asyncio.create_task(records.follow(kind)) for kind in ("services", "pods")]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in records.synced.values())), 30)
    server = DnsServer(KubeDns(records, args.upstream, args.netns).answer)
    udp, tcp = listening_sockets(args.netns)
    await server.start(udp, tcp)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for task in tasks:
        task.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pod", required=True, help="NS/NAME of the pod this serves as")
    parser.add_argument("--netns", required=True, help="the pod's network namespace (listeners, upstream queries)")
    parser.add_argument("--apiserver", required=True, help="the sandbox API server URL")
    parser.add_argument("--upstream", required=True, help="where names outside the cluster domain go")
    args = parser.parse_args(argv)
    ipaddress.IPv4Address(args.upstream)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (TimeoutError, OSError) as exc:
        print(f"kube-dns: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
