"""The sandbox end to end: `up` 2 nodes, pods via kubelet+CNI, probes, deletion, bad input, `down`.

Real namespaces, real API server, real packets. One sandbox per module keeps
it fast; a second, small one is crashed on purpose to prove `down` cleans up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from propolis.cni.plugin import host_ifname
from propolis_sandbox import cluster, netns
from propolis_sandbox.config import BPF_ROOT, SANDBOX_ENV, SandboxState
from propolis_sandbox.fixture import leftovers

pytestmark = pytest.mark.root
PROPOLIS = [sys.executable, "-m", "propolis.cli.main"]


def cli(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PROPOLIS, "sandbox", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"propolis sandbox {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def pods_yaml(namespace: str, names: list[str]) -> str:
    docs = []
    for name in names:
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}
spec:
  containers:
  - name: c
    image: agnhost
    ports:
    - {{containerPort: 80, name: http}}
    - {{containerPort: 53, protocol: UDP, name: dns}}
""")
    return "---\n".join(docs)


def assert_nothing_left(name: str) -> None:
    left = leftovers(name)
    assert not any(left.values()), left


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxState]:
    name = "t" + uuid.uuid4().hex[:7]
    try:
        out = cli("up", "--name", name, "--nodes", "2", "--services", "none").stdout
        assert "kubeconfig:" in out and "NATS: nats://" in out
        state = cluster.load_state_or_fail(name)
        yield state
    finally:
        cli("down", "--name", name, check=False)
        assert_nothing_left(name)


def get_json(state: SandboxState, *args: str) -> Any:
    return json.loads(cli("get", "--name", state.sandbox().name, *args, "-o", "json").stdout)


def test_up_is_idempotent_and_registers_nodes(sandbox: SandboxState) -> None:
    name = sandbox.sandbox().name
    again = cli("up", "--name", name, "--nodes", "2", "--services", "none").stdout
    assert sandbox.kubeconfig in again
    assert cluster.load_state_or_fail(name).supervisor_pid == sandbox.supervisor_pid
    nodes = get_json(sandbox, "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == [f"{name}-worker", f"{name}-worker2"]
    cfg = sandbox.sandbox()
    for n, node in enumerate(sorted(nodes, key=lambda n: n["metadata"]["name"]), start=1):
        assert node["spec"]["podCIDR"] == cfg.pod_cidr(n)
        assert {"type": "InternalIP", "address": cfg.node_ip(n)} in node["status"]["addresses"]
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_full_probe_matrix_tcp_and_udp(sandbox: SandboxState, tmp_path: Path) -> None:
    name = sandbox.sandbox().name
    manifest = tmp_path / "pods.yaml"
    manifest.write_text(pods_yaml("matrix", ["a", "b", "c", "d", "e", "f"]))
    cli("apply", "--name", name, "-f", str(manifest))
    out = cli("wait", "--name", name, "--timeout", "60").stdout
    assert "caught up" in out
    pods = get_json(sandbox, "pods")["items"]
    mine = [p for p in pods if p["metadata"]["namespace"] == "matrix"]
    assert len(mine) == 6 and all(p["status"]["phase"] == "Running" and p["status"]["podIP"] for p in mine)
    assert {p["spec"]["nodeName"] for p in mine} == {f"{name}-worker", f"{name}-worker2"}  # 3 per node
    assert all(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"]) for p in mine)
    result = json.loads(cli("probe", "--name", name, "--all", "-o", "json").stdout)
    matrix = [r for r in result if r["from"].startswith("matrix/") and r["to"].startswith("matrix/")]
    assert len(matrix) == 6 * 6 * 2
    assert {(r["protocol"], r["port"]) for r in matrix} == {("TCP", 80), ("UDP", 53)}
    assert all(r["connected"] for r in matrix), [r for r in matrix if not r["connected"]]
    # a port nobody listens on is refused: the probe can fail
    closed = cli("probe", "--name", name, "matrix/a", "matrix/d", "--port", "81", "--timeout", "1", check=False)
    assert closed.returncode == 1 and "not connected" in closed.stdout
    ok = cli("probe", "--name", name, "matrix/a", "matrix/d", "--protocol", "UDP")
    assert "answered by matrix/d" in ok.stdout
    text = cli("probe", "--name", name, "--all", "--ports", "80", "--protocols", "TCP").stdout
    assert "TCP/80" in text and "X" not in text.split("TCP/80", 1)[1].split("columns")[0]
    hostname = cli("exec", "--name", name, "matrix/b", "--", "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert next(p["status"]["podIP"] for p in mine if p["metadata"]["name"] == "b") in hostname


def test_pod_deletion_removes_namespace_and_veth(sandbox: SandboxState, tmp_path: Path) -> None:
    name = sandbox.sandbox().name
    cfg = sandbox.sandbox()
    manifest = tmp_path / "gone.yaml"
    manifest.write_text(pods_yaml("gone", ["x"]))
    cli("apply", "--name", name, "-f", str(manifest))
    cli("wait", "--name", name)
    pod = get_json(sandbox, "pod", "gone/x")
    node_ns = cfg.node_netns(cfg.node_number(pod["spec"]["nodeName"]))
    record = json.loads((cfg.node_dir(pod["spec"]["nodeName"]) / "pods" / "gone_x.json").read_text())
    host_if = record["host_ifname"]
    assert host_if == host_ifname(record["container_id"])
    with netns.iproute_in(node_ns) as ipr:
        assert ipr.link_lookup(ifname=host_if)
    assert netns.netns_exists(cfg.pod_netns("gone", "x"))
    cli("delete", "--name", name, "-f", str(manifest))
    cli("wait", "--name", name)
    wait_for(lambda: not netns.netns_exists(cfg.pod_netns("gone", "x")), what="pod namespace removal")
    with netns.iproute_in(node_ns) as ipr:
        assert not ipr.link_lookup(ifname=host_if)
    assert cli("get", "--name", name, "pod", "gone/x", check=False).returncode != 0


def test_bad_input_is_refused_and_nothing_applied(sandbox: SandboxState, tmp_path: Path) -> None:
    name = sandbox.sandbox().name
    bad = tmp_path / "bad.yaml"
    bad.write_text(pods_yaml("bad", ["ok1"]) + "---\n" + pods_yaml("bad", ["dup"]).replace(
        "- {containerPort: 53, protocol: UDP, name: dns}", "- {containerPort: 80, name: again}"))
    proc = cli("apply", "--name", name, "-f", str(bad), check=False)
    assert proc.returncode != 0
    assert "document 2" in proc.stderr and 'containerPort: Duplicate value: "80/TCP"' in proc.stderr
    assert cli("get", "--name", name, "pod", "bad/ok1", check=False).returncode != 0
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    proc = cli("apply", "--name", name, "-f", str(unknown), check=False)
    assert proc.returncode != 0 and "unknown kind 'Deployment'" in proc.stderr
    proc = cli("get", "--name", name, "deployments", check=False)
    assert proc.returncode != 0 and "unknown kind" in proc.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(pods_yaml("bad", ["Not_Valid"]))
    proc = cli("apply", "--name", name, "-f", str(invalid), check=False)
    assert proc.returncode != 0 and "metadata.name" in proc.stderr


def test_cidr_clash_is_refused(sandbox: SandboxState) -> None:
    other = "t" + uuid.uuid4().hex[:7]
    proc = cli("up", "--name", other, "--nodes", "1", "--services", "none",
               "--cluster-cidr", sandbox.sandbox().cluster_cidr, check=False)
    assert proc.returncode != 0 and "clashes with sandbox" in proc.stderr
    assert_nothing_left(other)


def test_down_after_crash_leaves_nothing(tmp_path: Path) -> None:
    name = "t" + uuid.uuid4().hex[:7]
    try:
        cli("up", "--name", name, "--nodes", "1", "--services", "none")
        manifest = tmp_path / "p.yaml"
        manifest.write_text(pods_yaml("crash", ["p"]))
        cli("apply", "--name", name, "-f", str(manifest))
        cli("wait", "--name", name)
        state = cluster.load_state_or_fail(name)
        pin = BPF_ROOT / f"{name}-worker"
        pin.mkdir(parents=True, exist_ok=True)  # what a datapath would have pinned
        assert netns.pids_with_env(SANDBOX_ENV, name)
        os.kill(state.supervisor_pid, 9)  # crash: children (NATS, API server, pod servers) stay behind
        wait_for(lambda: not cluster.supervisor_alive(state), what="supervisor death")
        assert netns.pids_with_env(SANDBOX_ENV, name) and netns.netns_exists(f"pp-{name}-1")
    finally:
        cli("down", "--name", name, check=False)
    assert_nothing_left(name)


def test_endpointslice_follows_ready_pods(sandbox: SandboxState, tmp_path: Path) -> None:
    name = sandbox.sandbox().name
    manifest = tmp_path / "svc.yaml"
    manifest.write_text(pods_yaml("svc", ["web1", "web2"]).replace("app: web1", "app: web").replace("app: web2", "app: web")
                        + """---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: svc}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: http}]
""")
    cli("apply", "--name", name, "-f", str(manifest))
    cli("wait", "--name", name)
    pods = {p["metadata"]["name"]: p["status"]["podIP"] for p in get_json(sandbox, "pods")["items"]
            if p["metadata"]["namespace"] == "svc"}

    def ready_addresses() -> set[str]:
        slices = [s for s in get_json(sandbox, "endpointslices")["items"]
                  if s["metadata"].get("namespace") == "svc"
                  and s["metadata"].get("labels", {}).get("kubernetes.io/service-name") == "web"]
        return {a for s in slices for e in (s.get("endpoints") or [])
                if (e.get("conditions") or {}).get("ready", True) for a in e["addresses"]}

    wait_for(lambda: ready_addresses() == set(pods.values()), what="both pods in the EndpointSlice")
    (tmp_path / "one.yaml").write_text(pods_yaml("svc", ["web2"]))
    cli("delete", "--name", name, "-f", str(tmp_path / "one.yaml"))
    wait_for(lambda: ready_addresses() == {pods["web1"]}, what="deleted pod leaving the EndpointSlice")
    svc = get_json(sandbox, "service", "svc/web")
    assert svc["spec"]["clusterIP"]
