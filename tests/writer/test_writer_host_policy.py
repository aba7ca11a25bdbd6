"""DesiredState with hostFirewall and policyAuditMode: the host endpoint's policy from CCNPs whose nodeSelector
matches this node's labels, the bus ports it always lets in from nodes, and audit mode on every endpoint."""

from __future__ import annotations

from test_writer_desired import LOCAL, NODE, cluster_inputs, record

from propolis.datapath.entries import PolicyEntry
from propolis.maps.endpoints import HOST_ENDPOINT_ID
from propolis.model import identity as idm
from propolis.writer.desired import HOST_CONTROL_PORTS, DesiredState

WORKER = {"node-role.kubernetes.io/worker": ""}


def with_host_policy(node_labels: dict[str, str]):  # type: ignore[no-untyped-def]
    inputs = cluster_inputs()
    inputs.nodes[NODE] = record("nodes", {"metadata": {"name": NODE, "labels": node_labels},
                                          "status": {"addresses": [{"type": "InternalIP", "address": "172.30.1.1"}]}})
    inputs.policies["hostfw"] = record("ciliumclusterwidenetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "host-firewall"},
        "spec": {"nodeSelector": {"matchLabels": WORKER},
                 "ingress": [{"fromEntities": ["cluster"], "toPorts": [{"ports": [{"port": "10250", "protocol": "TCP"}]}]}]}})
    inputs.policy_generation = 2
    return inputs


def test_selected_node_enforces_its_host_policy_and_keeps_the_bus():
    desired = DesiredState(NODE, cluster_name="c1", host_firewall=True)
    desired.update(with_host_policy(WORKER), LOCAL)
    host = desired.policies[HOST_ENDPOINT_ID]
    assert host.ingress_enforced and not host.egress_enforced and not host.audit
    assert PolicyEntry("ingress", identity=idm.RESERVED_REMOTE_NODE, protocol=6, port=10250) in host.entries
    for proto, port in HOST_CONTROL_PORTS:
        assert PolicyEntry("ingress", identity=idm.RESERVED_REMOTE_NODE, protocol=proto, port=port) in host.entries
    assert not any(e.identity == idm.RESERVED_WORLD for e in host.entries)


def test_unselected_node_is_not_enforced_and_host_firewall_off_has_no_host_endpoint():
    desired = DesiredState(NODE, cluster_name="c1", host_firewall=True)
    desired.update(with_host_policy({"role": "control-plane"}), LOCAL)
    host = desired.policies[HOST_ENDPOINT_ID]
    assert not host.ingress_enforced and not host.entries
    off = DesiredState(NODE, cluster_name="c1")
    off.update(with_host_policy(WORKER), LOCAL)
    assert HOST_ENDPOINT_ID not in off.policies


def test_global_audit_mode_reaches_every_endpoint_and_the_host():
    desired = DesiredState(NODE, cluster_name="c1", host_firewall=True, policy_audit_mode=True)
    desired.update(with_host_policy(WORKER), LOCAL)
    assert desired.policies[LOCAL[0].endpoint_id].audit and desired.policies[HOST_ENDPOINT_ID].audit
    per_node = DesiredState(NODE, cluster_name="c1", host_firewall=True, host_audit_mode=True)
    per_node.update(with_host_policy(WORKER), LOCAL)
    assert per_node.policies[HOST_ENDPOINT_ID].audit and not per_node.policies[LOCAL[0].endpoint_id].audit
