"""Cluster Mesh churn in the datapath-writer: a remote pod's add/remove/identity change reaches the ipcache
reconciler as its own row only, and the incrementally kept ipcache always equals one computed from scratch."""

from __future__ import annotations

from typing import Any

from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import ClusterNode, EndpointRecord, IpcacheEntry, K8sObject
from propolis.model import identity as idm
from propolis.reconcile import Reconciler
from propolis.writer.desired import DesiredState
from propolis.writer.inputs import ClusterInputs

REMOTE_ID = idm.cluster_identity(300, 2)


class RecordingTable(Reconciler[str, Any]):
    """The writer's ipcache reconciler's desired table (never run here), counting the rows handed to it."""

    def __init__(self) -> None:
        super().__init__("ipcache", None)  # type: ignore[arg-type]
        self.touched: list[str] = []

    def upsert(self, key: str, desired: Any) -> int:
        self.touched.append(key)
        return super().upsert(key, desired)

    def remove(self, key: str) -> int:
        self.touched.append(key)
        return super().remove(key)


def remote_pod(ip: str, identity: int = REMOTE_ID) -> KvEvent:
    return KvEvent(EventType.PUT, f"c2.ip.{ip}", IpcacheEntry(ip, 32, identity, "c2-worker", "172.30.2.1"), 1)


def gone(ip: str) -> KvEvent:
    return KvEvent(EventType.DELETE, f"c2.ip.{ip}", None, 2)


def from_scratch(inputs: ClusterInputs) -> dict:
    """What a freshly started writer computes from the same inputs."""
    fresh = ClusterInputs(**{**inputs.__dict__, "remote_endpoints_changed": set(inputs.remote_endpoints)})
    desired = DesiredState(node="c1-worker", cluster_name="c1")
    desired.update(fresh, [])
    return desired.ipcache


def setup() -> tuple[ClusterInputs, DesiredState, RecordingTable]:
    inputs = ClusterInputs()
    inputs.nodes["c1-worker"] = K8sObject("Node", "", "c1-worker", "uid", "1",
                                          status={"addresses": [{"type": "InternalIP", "address": "172.30.1.1"}]})
    inputs.endpoints[("ns", "a")] = EndpointRecord("ns", "a", "c1-worker", ["10.1.1.5"], 70000, [])
    inputs.apply_clustermesh(KvEvent(EventType.PUT, "c2.nodes.c2-worker",
                                     ClusterNode("c2", "c2-worker", ["172.30.2.1"], ["10.2.1.0/24"]), 1))
    for n in range(1, 51):
        inputs.apply_clustermesh(remote_pod(f"10.2.1.{n}"))
    desired, table = DesiredState(node="c1-worker", cluster_name="c1"), RecordingTable()
    desired.update(inputs, [])
    desired.hand_ipcache_changes(table)
    return inputs, desired, table


def step(inputs: ClusterInputs, desired: DesiredState, table: RecordingTable, *events: KvEvent) -> list[str]:
    table.touched.clear()
    for ev in events:
        inputs.apply_clustermesh(ev)
    desired.update(inputs, [])
    desired.hand_ipcache_changes(table)
    assert table.desired == desired.ipcache == from_scratch(inputs)
    return table.touched


def test_a_remote_pod_touches_only_its_own_row():
    inputs, desired, table = setup()
    assert len(table.desired) == 50 + 3  # remote pods, the remote node, this node, the local pod
    assert step(inputs, desired, table, remote_pod("10.2.1.99")) == ["10.2.1.99/32"]
    assert table.desired["10.2.1.99/32"].identity == REMOTE_ID
    assert step(inputs, desired, table, remote_pod("10.2.1.99", REMOTE_ID + 1)) == ["10.2.1.99/32"]
    assert step(inputs, desired, table, gone("10.2.1.99")) == ["10.2.1.99/32"]
    assert "10.2.1.99/32" not in table.desired
    assert step(inputs, desired, table) == []  # a pass with nothing changed hands nothing
    another_node = KvEvent(EventType.PUT, "c2.nodes.c2-worker2",
                           ClusterNode("c2", "c2-worker2", ["172.30.2.2"], ["10.2.2.0/24"]), 3)
    assert step(inputs, desired, table, another_node) == ["172.30.2.2/32"]


def test_local_rows_win_and_a_withdrawn_remote_pod_uncovers_what_was_below():
    inputs, desired, table = setup()
    # a remote pod claiming the remote node's address, then this cluster's pod address: the local row wins
    step(inputs, desired, table, remote_pod("172.30.2.1"), remote_pod("10.1.1.5"))
    assert table.desired["172.30.2.1/32"].identity == REMOTE_ID
    assert table.desired["10.1.1.5/32"].identity == 70000
    step(inputs, desired, table, gone("172.30.2.1"), gone("10.1.1.5"))
    assert table.desired["172.30.2.1/32"].identity == idm.RESERVED_REMOTE_NODE
    assert table.desired["10.1.1.5/32"].identity == 70000
    # a local change still redoes its rows
    del inputs.endpoints[("ns", "a")]
    assert step(inputs, desired, table) == ["10.1.1.5/32"]
