"""`spec.hostNetwork: true` on the sandbox, as a real kubelet and Cilium treat it: no CNI call and no pod
namespace; the pod's processes (its workload, what `pods/exec` runs) live in the node's network namespace and
cgroup, so they see the node's interfaces and socket LB serves their Service connections; podIP = hostIP = the
node's InternalIP; deleting the pod stops only its own processes; the pod is no endpoint (no endpoint record,
no identity, no ipcache row: its address stays the node's, host on its node and remote-node elsewhere, and
Hubble shows its traffic as the node's).

The pods are in the connectivity test's namespace so the product's kubeconfig client (`connectivity/kube.py`,
which runs `node:N` probes by exec in such a pod) drives the exec."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from propolis.bus import subjects
from propolis.bus.messages import EndpointRecord, IpcacheEntry
from propolis.connectivity.kube import ExecFailed, KubeCluster
from propolis.connectivity.scenarios import NAMESPACE
from propolis.maps import ipcache as ipcache_map
from propolis.model.identity import RESERVED_HOST, RESERVED_REMOTE_NODE
from propolis_sandbox import cgroups, cluster, netns
from propolis_sandbox.config import POD_UID_ENV
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.kubelet import PodRecord
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
HOST_POD, CONTROL_POD = "hostnet", "control"
HOST_PORT = 18090  # the hostNetwork pod's containerPort: a listener in the node's namespace


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


def manifests(n1: str, n2: str) -> list[dict]:
    def pod(name: str, node: str, labels: dict[str, str], port: int, **spec: object) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                "spec": {"nodeName": node, **spec, "containers": [{"name": "c", "image": "echo", "ports": [
                    {"name": "http", "containerPort": port, "protocol": "TCP"}]}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            pod(HOST_POD, n1, {"role": "host-only"}, HOST_PORT, hostNetwork=True),
            pod(CONTROL_POD, n1, {"role": "control"}, 8080),
            pod("web", n2, {"app": "web"}, 8080),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NAMESPACE},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}]


async def bucket_values(state, bucket: str) -> list[object]:
    bus = state.admin_bus("hostnet-test")
    await bus.connect(max_wait=5)
    try:
        return [entry.value for entry in (await (await bus.kv(bucket)).items()).values()]
    finally:
        await bus.close()


def pinned_ipcache(node_entry: dict) -> dict[str, int]:
    with ipcache_map.SPEC.open(node_entry["pin_dir"]) as bpf_map:
        return {e.cidr: e.identity for e in ipcache_map.dump(bpf_map)}


async def wait_until(predicate, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return value


async def test_host_network_pod_is_the_node(sandbox):
    cfg = sandbox.sandbox()
    n1, n2 = sandbox.nodes
    node_ip, node_ns, node_cg = n1["internal_ip"], n1["netns"], n1["cgroup"]
    docs = documents_from(NAMESPACE, manifests(n1["name"], n2["name"]))
    await cluster.apply_documents(sandbox, docs)
    kube = await KubeCluster.open(str(sandbox.kubeconfig), (sandbox.nats_url, None, None))
    try:
        await cluster.wait_running(sandbox, 3, namespace=NAMESPACE)
        await cluster.wait(sandbox)
        async with cluster.Api(sandbox.apiserver_url) as api:
            pod = await api.get(KINDS["Pod"], NAMESPACE, HOST_POD)
            svc = await api.get(KINDS["Service"], NAMESPACE, "web")
        status, uid = pod["status"], pod["metadata"]["uid"]
        assert (status["podIP"], status["podIPs"], status["hostIP"]) == (node_ip, [{"ip": node_ip}], node_ip), status
        assert not netns.netns_exists(cfg.pod_netns(NAMESPACE, HOST_POD)), "a hostNetwork pod got a namespace"
        record_file = cfg.node_dir(n1["name"]) / "pods" / f"{NAMESPACE}_{HOST_POD}.json"
        record = PodRecord(**json.loads(record_file.read_text()))  # what a restarted kubelet adopts
        assert (record.host_network, record.netns, record.ip) == (True, node_ns, node_ip), record

        # its workload answers on the node's address, from the node's namespace and cgroup
        workload = await asyncio.to_thread(netns.pids_with_env, POD_UID_ENV, uid)
        assert len(workload) == 1, workload
        assert Path(f"/proc/{workload[0]}/ns/net").stat().st_ino == netns.netns_inode(node_ns)
        assert unified(Path(f"/proc/{workload[0]}/cgroup").read_text()) == unified_path(node_cg)

        # exec runs in the node's namespace (eth0 with the node's address) and the node's cgroup
        eth0 = await kube.exec(HOST_POD, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], timeout=10)
        assert f"inet {node_ip}/" in eth0, eth0
        assert unified(await kube.exec(HOST_POD, ["cat", "/proc/self/cgroup"], timeout=10)) == unified_path(node_cg)
        # ... so socket LB translates its ClusterIP connection (the node has no route to a ClusterIP otherwise)
        fetch = (f"import socket; s = socket.create_connection(('{svc['spec']['clusterIP']}', 80), timeout=3); "
                 "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(4096).decode().split('\\r\\n\\r\\n', 1)[-1])")
        assert (await kube.exec(HOST_POD, ["python3", "-c", fetch], timeout=10)).strip() == f"{NAMESPACE}/web"
        # an ordinary pod's exec: its own namespace, in the node's cgroup, the per-packet path serves it
        assert (await kube.exec(CONTROL_POD, ["python3", "-c", fetch], timeout=10)).strip() == f"{NAMESPACE}/web"
        assert "eth0" in await kube.exec(CONTROL_POD, ["ip", "-o", "link"], timeout=10)

        # no endpoint: no record, no identity of its labels, no ipcache row; its address stays the node's
        values = await bucket_values(sandbox, subjects.IDENTITIES_BUCKET)
        endpoints = {v.name for v in values if isinstance(v, EndpointRecord) and v.namespace == NAMESPACE}
        assert CONTROL_POD in endpoints and HOST_POD not in endpoints, endpoints
        assert not [v for v in values if "k8s:role=host-only" in (getattr(v, "labels", None) or [])]
        rows = [v for v in await bucket_values(sandbox, subjects.IPCACHE_BUCKET) if isinstance(v, IpcacheEntry)]
        assert not [r for r in rows if r.ip == node_ip], rows
        assert pinned_ipcache(n1).get(f"{node_ip}/32") == RESERVED_HOST
        assert pinned_ipcache(n2).get(f"{node_ip}/32") == RESERVED_REMOTE_NODE
        # ... and Hubble shows its connection to `web` (on node 2) as from the remote node, not a pod
        from_node = await wait_until(lambda: _flows_from(sandbox, node_ip, "web"), "web's flows from the node")
        assert all(f["source"]["identity"] == RESERVED_REMOTE_NODE and "pod_name" not in f["source"]
                   and f["source"]["labels"] == ["reserved:remote-node"] for f in from_node), from_node[0]

        # deletion stops its own processes (the workload and a running exec), nothing else of the node
        running_exec = asyncio.create_task(kube.exec(HOST_POD, ["sleep", "120"], timeout=150))
        mine = await wait_until(lambda: _pids_if(uid, 2), "the exec'd sleep")
        listeners = [p for p in netns.pids_in_netns([node_ns]) if f"--pod node/{n1['name']}" in _cmdline(p)]
        assert listeners and not set(listeners) & set(mine), "the node runs its own listeners (10250, 22)"
        async with cluster.Api(sandbox.apiserver_url) as api:
            await api.request("DELETE", KINDS["Pod"].path(NAMESPACE, HOST_POD))
        await wait_until(lambda: _gone(sandbox, HOST_POD), "the pod's deletion")
        with contextlib.suppress(ExecFailed):
            await asyncio.wait_for(running_exec, 10)
        assert not netns.pids_with_env(POD_UID_ENV, uid), "the pod's processes survived its deletion"
        assert set(listeners) <= set(netns.pids_in_netns([node_ns])), "the node's own processes were killed"
        assert netns.netns_exists(node_ns) and not record_file.exists()
    finally:
        await kube.close()
        await cluster.delete_documents(sandbox, docs)


async def _pids_if(uid: str, count: int) -> list[int]:
    pids = await asyncio.to_thread(netns.pids_with_env, POD_UID_ENV, uid)
    return pids if len(pids) >= count else []


async def _gone(state, name: str) -> bool:
    async with cluster.Api(state.apiserver_url) as api:
        body = await api.list(KINDS["Pod"], NAMESPACE)
    return name not in {p["metadata"]["name"] for p in body.get("items", [])}


async def _flows_from(state, ip: str, pod: str) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "propolis.cli.main", "observe", "-o", "json", "--to-pod", f"{NAMESPACE}/{pod}",
        "--last", "500", stdout=asyncio.subprocess.PIPE, env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    out, _ = await proc.communicate()
    flows = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return [f for f in flows if (f.get("IP") or {}).get("source") == ip]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def unified(proc_cgroup: str) -> str:
    """The cgroup v2 path in a /proc/PID/cgroup text (its `0::` line; v1 hierarchies may be listed too)."""
    return next(line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::"))


def unified_path(cgroup: str) -> str:
    return f"/{Path(cgroup).relative_to(cgroups.cgroup2_mount())}"
