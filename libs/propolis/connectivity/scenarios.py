"""The scenarios of `propolis connectivity test`, named as in `cilium connectivity test`.

Why data, not code: a scenario is "apply these policies, then these connections must
succeed and those must be dropped". The runner (`runner.py`) deploys the test
workload once, then per scenario applies its policies, waits until every node
enforces them, probes with real packets, and deletes the policies again.

The workload (namespace `propolis-test`, like Cilium's `cilium-test`):
  client           kind=client name=client            on node 1
  client2          kind=client name=client2 other=client  on node 1
  echo-same-node   kind=echo name=echo-same-node      on node 1 (beside the clients)
  echo-other-node  kind=echo name=echo-other-node     on node 2
  Services echo-same-node (ClusterIP), echo-other-node (NodePort)
Echo pods answer on TCP 8080 and UDP 5353.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "propolis-test"
ECHO_PORT = 8080
ECHO_UDP_PORT = 5353
ALLOWED, DROPPED = "allowed", "dropped"
WORLD_IP = "203.0.113.10"  # a host of the sandbox's world namespace (sandbox/world.py): it answers when allowed


@dataclass(frozen=True)
class Check:
    """One connection and what must happen to it.

    ``source``: a pod name of the workload, or ``node:<n>`` (1-based) for a node's own namespace.
    ``target``: ``pod:<name>``, ``service:<name>`` (ClusterIP), ``nodeport:<service>@<n>`` (node n's IP),
    ``world:<ip>`` (a world host outside the cluster; a DROPPED expectation is proven by Hubble too: a flow
    to that IP with drop reason POLICY_DENIED, not merely by the missing answer), ``fqdn:<name>`` (a world
    name, resolved by the source pod through its own resolver, then like ``world:`` with its first address).
    """

    source: str
    target: str
    expect: str = ALLOWED
    port: int = ECHO_PORT
    protocol: str = "TCP"
    http: tuple[str, str] | None = None  # (method, path): one HTTP request, judged by its status
    status: int = 0  # with `http`: the status it must get

    def describe(self) -> str:
        request = f" {self.http[0]} {self.http[1]}" if self.http else ""
        return f"{self.source} -> {self.target}:{self.port}/{self.protocol}{request}"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    checks: tuple[Check, ...]
    policies: tuple[dict[str, Any], ...] = ()
    #: features the scenario needs (names as `propolis status` shows them); skipped with a reason otherwise
    needs: tuple[str, ...] = ()
    nodes: int = 1  # nodes the scenario needs (cross-node checks need 2)
    #: capture the underlay while probing: a check passes only if its probe and answer never appear there in
    #: cleartext, and the scenario only if pod traffic appeared as WireGuard (UDP 51871)
    underlay_capture: bool = False


def cnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def labels(**match: str) -> dict[str, Any]:
    return {"matchLabels": dict(match)}


ECHO_TCP = [{"ports": [{"port": str(ECHO_PORT), "protocol": "TCP"}]}]
#: clients may talk to the cluster entity only (two scenarios: what it allows, and what it drops)
CLIENT_EGRESS_TO_CLUSTER = cnp("client-egress-to-cluster", {"endpointSelector": labels(kind="client"),
                                                            "egress": [{"toEntities": ["cluster"]}]})

#: DNS to kube-dns through the DNS proxy, every name allowed (the seed's allow-aws-egress DNS rule)
TO_KUBE_DNS = {"toEndpoints": [labels(**{"io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"})],
               "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}
WORLD_TLS_PORT = 443  # world hosts answer TCP 80, 443 and 8080

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("no-policies", "without policies everything connects: pod to pod on the same node and across "
                            "nodes, TCP and UDP, pod to Service ClusterIP, NodePort from another node and "
                            "from a pod (Cilium's pod-to-remote-nodeport)",
             checks=(Check("client", "pod:echo-same-node"),
                     Check("client", "pod:echo-other-node"),
                     Check("client", "pod:echo-other-node", port=ECHO_UDP_PORT, protocol="UDP"),
                     Check("client2", "service:echo-same-node"),
                     Check("client", "service:echo-other-node"),
                     Check("node:1", "nodeport:echo-other-node@2"),
                     Check("client", "nodeport:echo-other-node@2"),
                     Check("client", f"world:{WORLD_IP}", port=80)),
             nodes=2),
    Scenario("client-egress-only-dns", "a client allowed egress only to port 53 reaches no echo pod; "
                                       "the other client is not selected and still does",
             policies=(cnp("client-egress-only-dns", {
                 "endpointSelector": labels(name="client"),
                 "egress": [{"toEndpoints": [{}],
                             "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}),),
             checks=(Check("client", "pod:echo-same-node", DROPPED),
                     Check("client", "service:echo-same-node", DROPPED),
                     Check("client2", "pod:echo-same-node"))),
    Scenario("echo-ingress-from-label", "echo pods accept TCP 8080 only from name=client",
             policies=(cnp("echo-ingress-from-client", {
                 "endpointSelector": labels(kind="echo"),
                 "ingress": [{"fromEndpoints": [labels(name="client")], "toPorts": ECHO_TCP}]}),),
             checks=(Check("client", "pod:echo-same-node"),
                     Check("client", "service:echo-same-node"),
                     Check("client2", "pod:echo-same-node", DROPPED),
                     Check("client", "pod:echo-same-node", DROPPED, port=ECHO_UDP_PORT, protocol="UDP"))),
    Scenario("netpol-echo-ingress-from-label", "the same with a Kubernetes NetworkPolicy",
             policies=({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": "echo-ingress-from-client", "namespace": NAMESPACE},
                        "spec": {"podSelector": labels(kind="echo"), "policyTypes": ["Ingress"],
                                 "ingress": [{"from": [{"podSelector": labels(name="client")}],
                                              "ports": [{"port": ECHO_PORT, "protocol": "TCP"}]}]}},),
             checks=(Check("client", "pod:echo-same-node"),
                     Check("client2", "pod:echo-same-node", DROPPED))),
    Scenario("allow-all-except-world", "clients may reach the cluster (entity cluster) but not the world",
             policies=(CLIENT_EGRESS_TO_CLUSTER,),
             checks=(Check("client", "pod:echo-same-node"),
                     Check("client", "pod:echo-other-node"),
                     Check("client", "service:echo-other-node")),
             nodes=2),
    Scenario("to-world-denied", "clients limited to the cluster entity: a packet to the world is dropped by "
                                "policy at the pod (proven with Hubble: a POLICY_DENIED flow), cluster still works",
             policies=(CLIENT_EGRESS_TO_CLUSTER,),
             checks=(Check("client", f"world:{WORLD_IP}", DROPPED, port=80),
                     Check("client", "pod:echo-same-node")),
             needs=("Hubble",)),
    Scenario("deny-all", "an empty ingress and egress rule on every pod: nothing connects",
             policies=(cnp("deny-all", {"endpointSelector": {}, "ingress": [{}], "egress": [{}]}),),
             checks=(Check("client", "pod:echo-same-node", DROPPED),
                     Check("client2", "service:echo-same-node", DROPPED),
                     Check("client", "pod:echo-same-node", DROPPED, port=ECHO_UDP_PORT, protocol="UDP"))),
    Scenario("deny-beats-allow", "an ingressDeny from name=client2 wins over an allow-all on the echo pods",
             policies=(cnp("echo-allow-all", {"endpointSelector": labels(kind="echo"),
                                              "ingress": [{"fromEntities": ["all"]}]}),
                       cnp("echo-deny-client2", {"endpointSelector": labels(kind="echo"),
                                                 "ingressDeny": [{"fromEndpoints": [labels(name="client2")]}]})),
             checks=(Check("client", "pod:echo-same-node"),
                     Check("client2", "pod:echo-same-node", DROPPED),
                     Check("client2", "service:echo-same-node", DROPPED))),
    Scenario("echo-ingress-l7", "HTTP GET /public allowed, /private denied by the L7 proxy",
             policies=(cnp("echo-ingress-l7-http", {
                 "endpointSelector": labels(kind="echo"),
                 "ingress": [{"fromEndpoints": [labels(kind="client")],
                              "toPorts": [{**ECHO_TCP[0], "rules": {"http": [{"method": "GET", "path": "/public"}]}}]}]}),),
             checks=(Check("client", "pod:echo-same-node", http=("GET", "/public"), status=200),
                     Check("client", "pod:echo-other-node", http=("GET", "/public"), status=200),
                     Check("client", "pod:echo-same-node", http=("GET", "/private"), status=403),
                     Check("client2", "pod:echo-other-node", http=("POST", "/public"), status=403)),
             needs=("L7 proxy",), nodes=2),
    Scenario("to-fqdns", "clients may reach api.stripe.com (toFQDNs, learned through the DNS proxy) and nothing "
                         "else: example.org resolves but its connection is dropped by policy",
             policies=(cnp("client-egress-to-fqdns", {"endpointSelector": labels(kind="client"), "egress": [
                 {"toFQDNs": [{"matchName": "api.stripe.com"}]}, TO_KUBE_DNS]}),),
             checks=(Check("client", "fqdn:api.stripe.com.", port=WORLD_TLS_PORT),
                     Check("client", "fqdn:example.org.", DROPPED, port=WORLD_TLS_PORT),
                     Check("client", "pod:echo-same-node", DROPPED)),
             needs=("DNS proxy", "Hubble")),
    Scenario("dns-only", "clients may only resolve names (DNS through the proxy): a resolved world name is "
                         "still dropped",
             policies=(cnp("client-egress-only-dns", {"endpointSelector": labels(kind="client"),
                                                      "egress": [TO_KUBE_DNS]}),),
             checks=(Check("client", "fqdn:api.stripe.com.", DROPPED, port=WORLD_TLS_PORT),
                     Check("client", "pod:echo-same-node", DROPPED)),
             needs=("DNS proxy", "Hubble")),
    Scenario("encryption", "pod-to-pod traffic between nodes crosses the underlay only as WireGuard UDP 51871, "
             "never in cleartext (captured on the underlay); same-node traffic never leaves the node",
             checks=(Check("client", "pod:echo-other-node"), Check("client", "pod:echo-other-node", port=ECHO_UDP_PORT,
                                                                   protocol="UDP"),
                     Check("client", "pod:echo-same-node")),
             needs=("Encryption",), nodes=2, underlay_capture=True),
)


@dataclass
class Selection:
    """`--test NAME` (repeatable) and `--test '!NAME'`: which scenarios run."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, values: list[str] | None) -> Selection:
        sel = cls()
        for raw in values or []:
            for item in (v.strip() for v in raw.split(",")):
                if item.startswith("!"):
                    sel.exclude.append(item[1:])
                elif item:
                    sel.include.append(item)
        return sel

    def unknown(self) -> list[str]:
        known = {s.name for s in SCENARIOS}
        return [n for n in self.include + self.exclude if n not in known]

    def chosen(self) -> list[Scenario]:
        return [s for s in SCENARIOS
                if (not self.include or s.name in self.include) and s.name not in self.exclude]
