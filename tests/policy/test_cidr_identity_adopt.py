"""CIDR identities survive a datapath-writer restart with the numbers the kernel already uses.

Numbers depend on allocation history: a fresh engine allocating in sorted order can swap two prefixes'
numbers, and while the ipcache and the policy maps are reconciled one after the other a denied prefix
would be classified as an allowed one. `adopt_cidr_identities` (fed from the pinned ipcache) prevents it.
"""

from __future__ import annotations

from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine


def cnp(name: str, cidr: str) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": [cidr]}]}}


def test_restarted_engine_keeps_history_dependent_numbers():
    old = PolicyEngine(cluster_name="default")
    old.update(policies=[cnp("late-alphabet", "192.168.0.0/16")], identities={})
    old.update(policies=[cnp("late-alphabet", "192.168.0.0/16"), cnp("early", "10.0.0.0/8")], identities={})
    before = old.cidr_identities()
    assert before["192.168.0.0/16"] < before["10.0.0.0/8"]  # allocation order, not sorted order

    fresh = PolicyEngine(cluster_name="default")
    fresh.update(policies=[cnp("late-alphabet", "192.168.0.0/16"), cnp("early", "10.0.0.0/8")], identities={})
    assert fresh.cidr_identities() != before  # what a restart did before: renumbered

    restarted = PolicyEngine(cluster_name="default")
    assert restarted.adopt_cidr_identities({**before, "10.244.1.7/32": 4242}) == 2  # pod identities ignored
    restarted.update(policies=[cnp("late-alphabet", "192.168.0.0/16"), cnp("early", "10.0.0.0/8"),
                               cnp("new", "172.16.0.0/12")], identities={})
    after = restarted.cidr_identities()
    assert {p: after[p] for p in before} == before
    assert after["172.16.0.0/12"] not in before.values()
    assert idm.MIN_LOCAL_IDENTITY <= after["172.16.0.0/12"] <= idm.MAX_LOCAL_IDENTITY
