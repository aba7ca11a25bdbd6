"""The synthetic compiler workload runs and produces the figures `propolis bench policy` reports (no timing asserted)."""

from propolis.policy.engine import PolicyEngine
from propolis_sandbox.bench.policy_workload import measure, synthetic_cluster


def test_synthetic_cluster_is_valid_and_selects_something():
    docs, table, named = synthetic_cluster(policies=30, identities=40, namespaces=3, apps=10)
    engine = PolicyEngine(cluster_name="default")
    engine.update(policies=docs, identities=table, named_ports=named)
    assert not engine.errors
    assert any(engine.compile_endpoint(n).ingress_enforced for n in table)


def test_measure_reports_every_figure():
    figures = measure(policies=20, identities=30, local_endpoints=10)
    assert figures["local_endpoints"] == 10 and figures["entries"] > 0
    assert {"full_seconds", "policy_change_seconds", "identity_change_seconds"} <= set(figures)
