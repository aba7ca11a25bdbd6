"""A synthetic cluster for timing the policy compiler (`propolis bench policy` part 1 builds on it).

Why here: the workload must exercise the same code the datapath-writer runs
(parse, selector cache, compile, incremental change) without any I/O, so the
numbers isolate the compiler. Timing is returned, never asserted.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any

from propolis.model.identity import pod_security_labels
from propolis.model.types import NumericIdentity
from propolis.policy.engine import CompileResult, PolicyEngine
from propolis_sandbox.bench.common import percentile


def synthetic_cluster(*, policies: int = 1000, identities: int = 1000, namespaces: int = 20, apps: int = 200,
                      seed: int = 1) -> tuple[list[dict[str, Any]], dict[NumericIdentity, list[str]],
                                              dict[int, dict[str, Any]]]:
    """(policy documents, identity table, named ports) shaped like a busy cluster."""
    rng = random.Random(seed)
    table = {NumericIdentity(256 + i): pod_security_labels(pod_labels={"app": f"app{i % apps}", "tier": f"t{i % 7}"},
                                          namespace=f"ns{i % namespaces}", cluster="default").strings()
             for i in range(identities)}
    named: dict[int, dict[str, Any]] = {n: {"http": ["TCP", 8080], "metrics": ["TCP", 9090]} for n in table}
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


@dataclass
class Workload:
    """The compiler figures plus what it produced, for the map-reconcile half of part 1."""

    figures: dict[str, Any]
    full: dict[int, CompileResult]                 # identity -> result after the full compute
    changes: list[dict[int, CompileResult]] = field(default_factory=list)  # after each incremental change


def compile_workload(*, policies: int = 1000, identities: int = 1000, local_endpoints: int = 1000,
                     changes: int = 20, changed_among: int | None = None, full_rounds: int = 1,
                     seed: int = 1) -> Workload:
    """Full compute for ``local_endpoints`` endpoints, then ``changes`` one-policy changes (each a
    port edit in a policy selecting one of the first ``changed_among`` identities, so a map subset
    of that size sees every change), then one new identity."""
    docs, table, named = synthetic_cluster(policies=policies, identities=identities, seed=seed)
    local = list(table)[:local_endpoints]
    full_seconds: list[float] = []
    for _ in range(max(1, full_rounds)):  # a fresh engine each round: nothing cached
        engine = PolicyEngine(cluster_name="default")
        started = time.perf_counter()
        engine.update(policies=docs, identities=table, named_ports=named)
        results = engine.compile_all(local)
        full_seconds.append(time.perf_counter() - started)
    full = percentile(full_seconds, 50)

    current = list(docs)
    change_seconds: list[float] = []
    after: list[dict[int, CompileResult]] = []
    span = max(1, min(len(docs), len(local), changed_among or len(local)))
    for i in range(changes):
        k = (i * 13) % span
        edited = copy.deepcopy(current[k])
        edited["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = str(20000 + i)
        current = [*current[:k], edited, *current[k + 1:]]
        started = time.perf_counter()
        engine.update(policies=current)
        after.append(engine.compile_all(local))
        change_seconds.append(time.perf_counter() - started)

    grown = dict(table)
    grown[NumericIdentity(max(table) + 1)] = pod_security_labels(pod_labels={"app": "app3", "tier": "t1"}, namespace="ns3",
                                                cluster="default").strings()
    started = time.perf_counter()
    engine.update(identities=grown)
    engine.compile_all(local)
    identity_change = time.perf_counter() - started
    figures = {"policies": policies, "identities": identities, "local_endpoints": len(local),
               "entries": sum(len(r.entries) for r in results.values()),
               "full_seconds": round(full, 4), "full_rounds": len(full_seconds),
               "full_p99_seconds": round(percentile(full_seconds, 99), 4),
               "policy_change_seconds": round(percentile(change_seconds, 50), 4) if change_seconds else None,
               "policy_changes": len(change_seconds),
               "policy_change_p50_ms": round(percentile(change_seconds, 50) * 1000, 3) if change_seconds else None,
               "policy_change_p99_ms": round(percentile(change_seconds, 99) * 1000, 3) if change_seconds else None,
               "identity_change_seconds": round(identity_change, 4)}
    return Workload(figures, results, after)


def measure(*, policies: int = 1000, identities: int = 1000, local_endpoints: int = 1000,
            changes: int = 20, seed: int = 1) -> dict[str, Any]:
    """Compiler figures only (see compile_workload)."""
    return compile_workload(policies=policies, identities=identities, local_endpoints=local_endpoints,
                            changes=changes, seed=seed).figures
