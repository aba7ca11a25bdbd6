"""The incremental engine (selector cache, row cache, targeted invalidation) must always agree with a
fresh engine built from the same inputs. A seeded random walk of identity, named-port and policy changes."""

import random

import pytest

from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine

APPS = ["web", "api", "db", "cache"]
NAMESPACES = ["a", "b"]


def random_identity(rng):
    return idm.pod_security_labels(pod_labels={"app": rng.choice(APPS), "v": str(rng.randint(1, 3))},
                                   namespace=rng.choice(NAMESPACES), cluster="default").strings()


def random_policy(rng, i):
    app = rng.choice(APPS)
    peer = rng.choice([
        {"fromEndpoints": [{"matchLabels": {"app": rng.choice(APPS)}}]},
        {"fromEndpoints": [{"matchExpressions": [{"key": "v", "operator": "In", "values": ["1", "2"]}]}]},
        {"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": rng.choice(NAMESPACES)}}]},
        {"fromEntities": [rng.choice(["cluster", "world", "host", "all"])]},
        {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": [f"10.{rng.randint(0, 3)}.0.0/16"]}]},
        {"fromRequires": [{"matchLabels": {"v": "1"}}]},
        {},
    ])
    if rng.random() < 0.5 and "fromRequires" not in peer:
        peer["toPorts"] = [{"ports": [rng.choice([{"port": "80", "protocol": "TCP"}, {"port": "http"},
                                                  {"port": "8000", "endPort": 8100}])]}]
    egress = {"toEndpoints": [{"matchLabels": {"app": rng.choice(APPS)}}],
              "toPorts": [{"ports": [{"port": rng.choice(["pg", "5432"]), "protocol": "TCP"}]}]}
    spec = {"endpointSelector": {"matchLabels": {"app": app}}}
    rules = [peer]
    if "toPorts" in peer and rng.random() < 0.2:  # sometimes a second rule: the same peers on every port
        rules.append({k: v for k, v in peer.items() if k != "toPorts"})
    spec["ingressDeny" if rng.random() < 0.2 else "ingress"] = rules
    if spec.get("ingressDeny") and "toPorts" in peer and peer["toPorts"][0]["ports"][0].get("port") == "http":
        spec["ingressDeny"] = [{k: v for k, v in peer.items() if k != "toPorts"}]
    if rng.random() < 0.5:
        spec["egress"] = [egress]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": rng.choice(NAMESPACES)}, "spec": spec}


def snapshot(engine, identities):
    out = {}
    for n in identities:
        r = engine.compile_endpoint(n)
        out[n] = (r.ingress_enforced, r.egress_enforced, frozenset(r.entries))
    return out


def canonical(snap, cidrs):
    """CIDR identity numbers may differ between engines: compare them by prefix."""
    by_number = {v: k for k, v in cidrs.items()}
    return {n: (i, e, frozenset((x.direction, by_number.get(x.identity, x.identity), x.protocol, x.port,
                                 x.end_port, x.deny) for x in rows)) for n, (i, e, rows) in snap.items()}


@pytest.mark.parametrize("seed", range(6))
def test_incremental_matches_fresh(seed):
    rng = random.Random(seed)
    identities = {256 + i: random_identity(rng) for i in range(12)}
    named = {n: {"http": ["TCP", 8080]} for n in identities if rng.random() < 0.5}
    named.update({n: {"pg": ["TCP", 5432]} for n in identities if rng.random() < 0.3})
    policies = {f"p{i}": random_policy(rng, i) for i in range(8)}
    live = PolicyEngine(cluster_name="default")
    rows_seen = 0
    for step in range(40):
        live.update(policies=list(policies.values()), identities=identities, named_ports=named)
        fresh = PolicyEngine(cluster_name="default")
        fresh.update(policies=list(policies.values()), identities=identities, named_ports=named)
        assert not live.errors and not fresh.errors
        compiled = snapshot(live, identities)
        assert canonical(compiled, live.cidr_identities()) == \
            canonical(snapshot(fresh, identities), fresh.cidr_identities()), f"seed {seed} step {step}"
        rows_seen += sum(len(rows) for _, _, rows in compiled.values())
        action = rng.choice(["add-id", "del-id", "relabel", "named", "add-pol", "del-pol", "change-pol"])
        if action == "add-id":
            identities[max(identities) + 1] = random_identity(rng)
        elif action == "del-id" and len(identities) > 2:
            victim = rng.choice(sorted(identities))
            identities.pop(victim)
            named.pop(victim, None)
        elif action == "relabel":
            identities[rng.choice(sorted(identities))] = random_identity(rng)
        elif action == "named":
            n = rng.choice(sorted(identities))
            named[n] = rng.choice([{"http": ["TCP", 8081]}, {"pg": ["TCP", 6432]}, {}])
        elif action == "add-pol":
            key = f"p{len(policies) + step + 100}"
            policies[key] = random_policy(rng, key[1:])
        elif action == "del-pol" and policies:
            policies.pop(rng.choice(sorted(policies)))
        elif action == "change-pol" and policies:
            key = rng.choice(sorted(policies))
            replacement = random_policy(rng, key[1:])
            replacement["metadata"] = policies[key]["metadata"]
            policies[key] = replacement
    assert rows_seen, f"seed {seed}: the walk never compiled a policy row, so nothing was compared"
