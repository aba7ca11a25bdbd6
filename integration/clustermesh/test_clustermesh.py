"""Cluster Mesh between two sandboxes (`sandbox up --cluster-id`, `clustermesh connect`), with real packets.

One pair for the module: c1 (id 1) and c2 (id 2), each with pods mesh/a and mesh/b, connected both ways.
Checked: both sides report the other ready; pods reach each other across clusters by address; remote pods
land in every node's ipcache with their remote identities; a policy allowing only clients of
`io.cilium.k8s.policy.cluster: c2`; policy-default-local-cluster (a selector naming no cluster selects only
the local one); the read-only remote user writes nothing; disconnect withdraws the remote's state at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack

import pytest
import yaml

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.clustermesh.remotes import load_remotes
from propolis.model import identity as idm
from propolis_sandbox import cluster, probe
from propolis_sandbox import clustermesh as mesh_sandbox
from propolis_sandbox.cli.clustermesh_cmd import mesh_report, render
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox, unique_name

pytestmark = pytest.mark.root

NS = "mesh"
SERVICES = "k8s-watcher,identity-allocator,datapath-writer,clustermesh-apiserver"


def manifests() -> list[dict]:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p, "namespace": NS, "labels": {"app": p}},
             "spec": {"containers": [{"name": "echo", "image": "echo", "ports": [{"containerPort": 8080}]}]}}
            for p in ("a", "b")]
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}, *pods]


def write(tmp_path, docs: list[dict]) -> str:
    path = tmp_path / f"m-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


async def wait_for(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def report(state) -> dict | None:
    bus = state.admin_bus("clustermesh-test")
    await bus.connect(max_wait=5)
    try:
        return await mesh_report(bus)
    finally:
        await bus.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with ExitStack() as stack:
        c1 = stack.enter_context(running_sandbox(name=unique_name("m"), services=SERVICES, encryption="",
                                                 cluster_id=1))
        c2 = stack.enter_context(running_sandbox(name=unique_name("m"), services=SERVICES, encryption="",
                                                 cluster_id=2))
        for state in (c1, c2):
            asyncio.run(cluster.apply(state, [write(tmp_path_factory.mktemp("mesh"), manifests())]))
        for state in (c1, c2):
            asyncio.run(cluster.wait_running(state, 2, namespace=NS))
            asyncio.run(cluster.wait(state, timeout=60))
        mesh_sandbox.connect(c1, c2)

        async def ready():
            return all([(r := await report(s)) and r["total"] == 1 and r["ready"] == 1 for s in (c1, c2)])
        asyncio.run(wait_for(ready, 30, "both clusters to report the other ready"))
        yield c1, c2


async def pod_ip(state, name: str) -> str:
    return str((await cluster.get(state, "pods", f"{NS}/{name}"))["status"]["podIP"])


async def connects(state, source: str, ip: str) -> bool:
    spec = probe.ProbeSpec(cluster.source_netns(state, f"{NS}/{source}"), ip, 8080, "TCP")
    return (await probe.probe(spec, timeout=1.5)).connected


def ipcache_rows(node: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "propolis.cli.main", "bpf", "ipcache", "list", "--node", node,
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return {r["cidr"]: r["identity"] for r in json.loads(out)}


async def test_both_clusters_report_the_other_ready(mesh):
    c1, c2 = mesh
    r1 = await report(c1)
    assert "Cluster Mesh: 1/1 remote clusters ready" in render(r1)
    assert r1["remotes"][0]["name"] == c2.sandbox().name and r1["remotes"][0]["id"] == 2
    assert r1["remotes"][0]["entries"] > 0
    status = subprocess.run([sys.executable, "-m", "propolis.cli.main", "status", "--name", c1.sandbox().name],
                            capture_output=True, text=True, timeout=30).stdout
    line = next(line for line in status.splitlines() if line.startswith("Cluster Mesh:"))
    assert "1/1 remote clusters ready" in line, status


async def test_pods_reach_each_other_across_clusters(mesh):
    c1, c2 = mesh
    assert await connects(c1, "a", await pod_ip(c2, "b"))
    assert await connects(c2, "a", await pod_ip(c1, "b"))


async def test_remote_pods_are_in_every_node_ipcache_with_their_remote_identity(mesh):
    c1, c2 = mesh
    remote = {await pod_ip(c2, p) for p in ("a", "b")}

    async def landed():
        tables = [ipcache_rows(node) for node in c1.sandbox().node_names()]
        return all(f"{ip}/32" in rows and idm.cluster_id_of(rows[f"{ip}/32"]) == 2 for rows in tables for ip in remote)
    await wait_for(landed, 20, "c2's pods in c1's ipcaches")


def policy(name: str, app: str, from_labels: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": from_labels}]}]}}


async def test_policy_selects_clients_by_cluster_and_defaults_to_the_local_cluster(mesh, tmp_path):
    c1, c2 = mesh
    c2_name = c2.sandbox().name
    a1, b1 = await pod_ip(c1, "a"), await pod_ip(c1, "b")
    docs = [policy("only-c2-b", "a", {"app": "b", "io.cilium.k8s.policy.cluster": c2_name}),
            policy("from-a", "b", {"app": "a"})]  # no cluster label: only c1's a
    await cluster.apply(c1, [write(tmp_path, docs)])
    await cluster.wait(c1, timeout=30)

    async def enforced():
        return not await connects(c1, "b", a1)
    await wait_for(enforced, 20, "the policy on c1/a")
    assert await connects(c2, "b", a1), "c2's b is allowed by io.cilium.k8s.policy.cluster"
    assert not await connects(c2, "a", a1), "c2's a is not b"
    assert await connects(c1, "a", b1), "c1's a matches the cluster-less selector"
    assert not await connects(c2, "a", b1), "policy-default-local-cluster: c2's a is not selected"
    await cluster.delete(c1, [write(tmp_path, docs)])


def api_docs(pod: str, affinity: str) -> list[dict]:
    """A backend pod of `api` (its name says which cluster answered) and the Service, global in both clusters."""
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS, "labels": {"app": "api"}},
             "spec": {"containers": [{"name": "echo", "image": "echo", "ports": [{"containerPort": 8080}]}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": "api", "namespace": NS,
                "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
             "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]}}]


async def answers(state, ip: str, tries: int = 16) -> set[str]:
    spec = probe.ProbeSpec(cluster.source_netns(state, f"{NS}/a"), ip, 80, "TCP")
    results = await probe.probe_all([spec] * tries, timeout=1.5, concurrency=4)
    return {r.answered_by for r in results if r.connected}


def listed_backends(node: str, frontend: str) -> dict[str, dict]:
    """`propolis service list -o json` of a node: the frontend's backends by address (the maps, read back)."""
    out = subprocess.run([sys.executable, "-m", "propolis.cli.main", "service", "list", "--node", node, "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return {b["address"]: b for v in json.loads(out) if v["frontend"] == f"{frontend}:80" for b in v["backends"]}


async def test_a_global_service_spreads_over_both_clusters_and_prefers_local_with_failover(mesh, tmp_path):
    c1, c2 = mesh
    await cluster.apply(c2, [write(tmp_path, api_docs("api2", "none"))])
    await cluster.apply(c1, [write(tmp_path, api_docs("api1", "none"))])
    for state in (c1, c2):
        await cluster.wait_running(state, 3, namespace=NS)
    async with cluster.Api(c1.apiserver_url) as api:
        frontend = (await cluster.resolve_destination(api, f"{NS}/api")).ip

    async def both():
        return await answers(c1, frontend) == {f"{NS}/api1", f"{NS}/api2"}
    await wait_for(both, 30, "c1's api frontend to spread over both clusters")
    api1, api2 = await pod_ip(c1, "api1"), await pod_ip(c2, "api2")
    node = c1.sandbox().node_names()[0]

    async def marked(expected: dict) -> bool:  # every node of c1 gets there, each at its own pace
        shown = listed_backends(node, frontend)
        return {a: (b["cluster_id"], b.get("cluster"), b["preferred"]) for a, b in shown.items()} == expected
    await wait_for(lambda: marked({f"{api1}:8080": (0, None, False), f"{api2}:8080": (2, c2.sandbox().name, False)}),
                   10, "service list to mark c2's backend remote, none preferred")

    await cluster.apply(c1, [write(tmp_path, api_docs("api1", "local")[1:])])

    async def local_only():
        return await answers(c1, frontend) == {f"{NS}/api1"}
    await wait_for(local_only, 20, "affinity local to keep c1's traffic in c1")
    await wait_for(lambda: marked({f"{api1}:8080": (0, None, True)}), 10, "c1's own backend marked preferred")
    table = subprocess.run([sys.executable, "-m", "propolis.cli.main", "service", "list", "--node", node],
                           capture_output=True, text=True, check=True).stdout
    assert f"=> {api1}:8080/TCP (active) (preferred)" in table, table

    await cluster.delete(c1, [write(tmp_path, api_docs("api1", "local")[:1])])

    async def failed_over():
        return await answers(c1, frontend) == {f"{NS}/api2"}
    await wait_for(failed_over, 30, "failover to c2's backend once c1 has none")
    await wait_for(lambda: marked({f"{api2}:8080": (2, c2.sandbox().name, False)}), 10,
                   "failover: c2's backend in use, remote and not preferred")


async def bucket(state, name: str, keys: str = ">") -> dict:
    bus = state.admin_bus("clustermesh-test-read")
    await bus.connect(max_wait=5)
    try:
        return {k: e.value for k, e in (await (await bus.kv(name)).items(keys)).items()}
    finally:
        await bus.close()


async def test_a_restarted_remote_nats_converges_without_stale_entries(mesh, tmp_path):
    """c2's nats-server is killed (its supervisor restarts it on the same port and store); meanwhile a pod goes
    and another comes. c1's cache ends equal to c2's export, and the new pod reaches c1's ipcache."""
    c1, c2 = mesh
    c2_name = c2.sandbox().name
    b_doc = manifests()[2]
    os.kill(load_state(c2_name).nats_pid, signal.SIGKILL)
    await cluster.delete(c2, [write(tmp_path, [b_doc])])
    started = time.monotonic()
    await cluster.apply(c2, [write(tmp_path, [{**b_doc, "metadata": {**b_doc["metadata"], "name": "late",
                                                                      "labels": {"app": "late"}}}])])
    await cluster.wait_running(c2, 3, namespace=NS)
    late = await pod_ip(c2, "late")

    async def converged():
        export = await bucket(c2, subjects.CLUSTERMESH_BUCKET)
        cached = await bucket(c1, subjects.CLUSTERMESH_CACHE_BUCKET, f"{c2_name}.>")
        return f"ip.{late}" in export and cached == {f"{c2_name}.{k}": v for k, v in export.items()}
    await wait_for(converged, 40, "c1's cache of c2 to equal c2's export again")

    async def in_ipcache():
        return all(f"{late}/32" in ipcache_rows(node) for node in c1.sandbox().node_names())
    await wait_for(in_ipcache, 20, "c2's new pod in c1's ipcaches")
    print(f"pod created in c2 -> in every c1 ipcache (through a NATS restart): {time.monotonic() - started:.2f}s")


async def test_the_remote_user_reads_the_export_and_writes_nothing(mesh):
    c1, c2 = mesh
    remote = load_remotes(c1.sandbox().clustermesh_dir)[c2.sandbox().name]
    bus = Bus(remote.nats_url, name="clustermesh-test-remote", user=remote.user, password=remote.password)
    await bus.connect(max_wait=5)
    try:
        export = await bus.kv(subjects.CLUSTERMESH_BUCKET)
        assert "cluster-config" in await export.items()
        for bucket, key in ((subjects.CLUSTERMESH_BUCKET, "ip.10.99.99.99"), (subjects.K8S_BUCKET, "pods.x.y"),
                            (subjects.IDENTITIES_BUCKET, "id.99")):
            with pytest.raises(Exception):  # noqa: B017 - a permissions violation: whichever error nats-py raises
                await bus.nc.publish(f"$KV.{bucket}.{key}", b"forged")
                await bus.nc.flush(timeout=2)
                await (await bus.js.key_value(bucket)).put(key, b"forged")
    finally:
        await bus.close()
    admin = c2.admin_bus("clustermesh-test-admin")
    await admin.connect(max_wait=5)
    try:
        assert await (await admin.kv(subjects.CLUSTERMESH_BUCKET)).get("ip.10.99.99.99") is None
        assert await (await admin.kv(subjects.K8S_BUCKET)).get("pods.x.y") is None
    finally:
        await admin.close()


async def test_disconnect_withdraws_the_remote_at_once(mesh):
    c1, c2 = mesh
    await asyncio.to_thread(mesh_sandbox.disconnect, c1, c2, c2.sandbox().name)  # pyroute2's IPRoute: no loop

    async def withdrawn():
        bus = c1.admin_bus("clustermesh-test-cache")
        await bus.connect(max_wait=5)
        try:
            left = await (await bus.kv(subjects.CLUSTERMESH_CACHE_BUCKET)).items()
        finally:
            await bus.close()
        r = await report(c1)
        return not left and r is not None and r["total"] == 0
    await wait_for(withdrawn, 10, "c2's cached state to be withdrawn from c1")
    assert not await connects(c1, "a", await pod_ip(c2, "a"))
