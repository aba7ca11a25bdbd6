"""A node's datapath-writer inputs receive only what that node reads (real nats-server): its own node's Pods,
the cluster-wide kinds and the watermarks; another node's Pod churn is never delivered to it (counted by the
server on the watch's consumer, and by what reaches the tables)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import IdentityRecord, K8sObject, Watermark
from propolis.k8s.kinds import KINDS
from propolis.writer.inputs import CLUSTER_KINDS, ClusterInputs

CHURN = 50


def pod(name: str, node: str, rv: int) -> K8sObject:
    return KINDS["pods"].to_record({"metadata": {"name": name, "namespace": "prod", "uid": f"uid-{name}",
                                                 "resourceVersion": str(rv)},
                                    "spec": {"nodeName": node}, "status": {"podIP": "10.244.1.9"}})


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def delivered_to(bus: Bus, node: str) -> int:
    """Messages the server delivered to the k8s watch of ``node``'s inputs (its consumer filters its Pods)."""
    mine = [c for c in await bus.js.consumers_info(f"KV_{subjects.K8S_BUCKET}")
            if f"$KV.{subjects.K8S_BUCKET}.{subjects.node_pods_keys(node)}" in (c.config.filter_subjects or [])]
    assert len(mine) == 1, f"one k8s watch consumer of node {node}, found {len(mine)}"
    return int(mine[0].delivered.consumer_seq or 0) if mine[0].delivered else 0


async def test_a_node_receives_no_other_nodes_pod_updates(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_mod, "WATCH_START_JITTER_S", 0.0)
    k8s, ids = await bus.kv(subjects.K8S_BUCKET), await bus.kv(subjects.IDENTITIES_BUCKET)
    rv = 1
    await k8s.put(subjects.k8s_key("namespaces", None, "prod"), KINDS["namespaces"].to_record(
        {"metadata": {"name": "prod", "uid": "uid-prod", "resourceVersion": "1"}}))
    await k8s.put(subjects.k8s_key("pods", "prod", "a-1", node="a"), pod("a-1", "a", rv))
    await k8s.put(subjects.k8s_key("pods", "prod", "b-1", node="b"), pod("b-1", "b", rv))
    await k8s.put(subjects.WATERMARK_KEY, Watermark(rv, 0.0, "e1"))
    await ids.put(subjects.identity_key(1000), IdentityRecord(1000, ["k8s:app=x"]))
    await ids.put(subjects.WATERMARK_KEY, Watermark(rv, 0.0, "i1"))
    inputs = {node: ClusterInputs() for node in ("a", "b")}
    tasks = [asyncio.create_task(i.follow(k8s, ids, node=node), name=f"follow-{node}") for node, i in inputs.items()]
    try:
        await eventually(lambda: all(i.synced for i in inputs.values()), "both nodes' inputs synced")
        assert set(inputs["a"].pods) == {("prod", "a-1")} and set(inputs["b"].pods) == {("prod", "b-1")}
        assert "prod" in inputs["a"].namespaces and 1000 in inputs["a"].identities
        before = {node: await delivered_to(bus, node) for node in inputs}

        for _ in range(CHURN):  # node b's pod churns; node a's pod changes once; a watermark behind each
            rv += 1
            await k8s.put(subjects.k8s_key("pods", "prod", "b-1", node="b"), pod("b-1", "b", rv))
        rv += 1
        await k8s.put(subjects.k8s_key("pods", "prod", "a-1", node="a"), pod("a-1", "a", rv))
        await k8s.put(subjects.WATERMARK_KEY, Watermark(rv, 0.0, "e1"))
        await eventually(lambda: all(i.k8s_watermark == rv for i in inputs.values()), "the last watermark")
        assert inputs["b"].pods[("prod", "b-1")].resource_version == str(rv - 1)
        assert inputs["a"].pods[("prod", "a-1")].resource_version == str(rv)
        assert set(inputs["a"].pods) == {("prod", "a-1")}
        assert await delivered_to(bus, "a") - before["a"] == 2, "node a got more than its pod and the watermark"
        assert await delivered_to(bus, "b") - before["b"] == CHURN + 1  # the churn reached its own node
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_the_writer_watches_every_kind_it_applies() -> None:
    """`CLUSTER_KINDS` (what a node watches of every node) is every mirrored kind but the node-scoped ones."""
    assert set(CLUSTER_KINDS) == set(KINDS) - set(subjects.NODE_SCOPED_KINDS)
