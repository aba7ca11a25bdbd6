"""A synthetic cluster for timing the policy compiler (`propolis bench policy` part 1 builds on it).

Why here: the workload must exercise the same code the datapath-writer runs
(parse, selector cache, compile, incremental change) without any I/O, so the
numbers isolate the compiler. Timing is returned, never asserted.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

from propolis.model.identity import pod_security_labels
from propolis.policy.engine import PolicyEngine


def synthetic_cluster(*, policies: int = 1000, identities: int = 1000, namespaces: int = 20, apps: int = 200,
                      seed: int = 1) -> tuple[list[dict[str, Any]], dict[int, list[str]], dict[int, dict[str, Any]]]:
    """(policy documents, identity table, named ports) shaped like a busy cluster."""
    rng = random.Random(seed)
    table = {256 + i: pod_security_labels(pod_labels={"app": f"app{i % apps}", "tier": f"t{i % 7}"},
                                          namespace=f"ns{i % namespaces}", cluster="default").strings()
             for i in range(identities)}
    named = {n: {"http": ["TCP", 8080], "metrics": ["TCP", 9090]} for n in table}
    docs = []
    for i in range(policies):
        peer_app = f"app{rng.randrange(apps)}"
        docs.append({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": f"ns{i % namespaces}"},
            "spec": {"endpointSelector": {"matchLabels": {"app": f"app{i % apps}"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer_app}},
                                                    {"matchExpressions": [{"key": "tier", "operator": "In",
                                                                           "values": ["t1", "t2"]}]}],
                                  "toPorts": [{"ports": [{"port": str(1000 + i % 5000), "protocol": "TCP"},
                                                         {"port": "http"}]}]}],
                     "egress": [{"toEntities": ["kube-apiserver", "host"]},
                                {"toCIDRSet": [{"cidr": f"10.{i % 250}.0.0/16",
                                                "except": [f"10.{i % 250}.1.0/24"]}]}]}})
    return docs, table, named


def measure(*, policies: int = 1000, identities: int = 1000, local_endpoints: int = 1000,
            seed: int = 1) -> dict[str, Any]:
    """Full compute for ``local_endpoints`` endpoints, then one policy change and one new identity."""
    docs, table, named = synthetic_cluster(policies=policies, identities=identities, seed=seed)
    local = list(table)[:local_endpoints]
    engine = PolicyEngine(cluster_name="default")
    started = time.perf_counter()
    engine.update(policies=docs, identities=table, named_ports=named)
    results = engine.compile_all(local)
    full = time.perf_counter() - started

    changed = copy.deepcopy(docs)
    changed[len(changed) // 2]["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "7777"
    started = time.perf_counter()
    engine.update(policies=changed)
    engine.compile_all(local)
    policy_change = time.perf_counter() - started

    grown = dict(table)
    grown[max(table) + 1] = pod_security_labels(pod_labels={"app": "app3", "tier": "t1"}, namespace="ns3",
                                                cluster="default").strings()
    started = time.perf_counter()
    engine.update(identities=grown)
    engine.compile_all(local)
    identity_change = time.perf_counter() - started
    return {"policies": policies, "identities": identities, "local_endpoints": len(local),
            "entries": sum(len(r.entries) for r in results.values()),
            "full_seconds": round(full, 4), "policy_change_seconds": round(policy_change, 4),
            "identity_change_seconds": round(identity_change, 4)}
