"""The sandbox API as a process (`python -m propolis_sandbox.apiserver`), driven by the real kubectl:
get/apply/create/replace/patch/delete, label selectors, the status subresource, and exit on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from propolis_sandbox.testing.tools import required_tool

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: smoke}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: smoke, labels: {app: web}}
spec:
  containers: [{name: c, image: echo, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: smoke}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-web, namespace: smoke}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cluster-wide}
specs: [{endpointSelector: {}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: smoke}
spec: {podSelector: {}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    log = (tmp_path / "apiserver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "propolis_sandbox.apiserver", "--run-dir", str(run_dir),
                             "--service-cidr", "10.97.0.0/16"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (run_dir / "apiserver.url").exists():
            assert proc.poll() is None, (tmp_path / "apiserver.log").read_text()
            assert time.monotonic() < deadline, "apiserver.url not written"
            time.sleep(0.05)
        yield run_dir
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not (run_dir / "apiserver.url").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def kubectl(run_dir: Path, *args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([required_tool("kubectl"), "--kubeconfig", str(run_dir / "kubeconfig"), *args], input=stdin,
                            capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result


def test_kubectl_against_the_sandbox_api(server: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "smoke.yaml"
    manifest.write_text(MANIFEST)
    out = kubectl(server, "apply", "-f", str(manifest)).stdout
    assert "pod/web created" in out and "ciliumnetworkpolicy.cilium.io/allow-web created" in out
    assert "unchanged" in kubectl(server, "apply", "-f", str(manifest)).stdout

    pods = json.loads(kubectl(server, "get", "pods", "-A", "-o", "json").stdout)
    assert [p["metadata"]["name"] for p in pods["items"]] == ["web"]
    assert kubectl(server, "get", "cnp", "-n", "smoke", "-o", "name").stdout.strip() == \
        "ciliumnetworkpolicy.cilium.io/allow-web"
    assert kubectl(server, "get", "ccnp", "-o", "name").stdout.strip() == \
        "ciliumclusterwidenetworkpolicy.cilium.io/cluster-wide"
    svc = json.loads(kubectl(server, "get", "svc", "web", "-n", "smoke", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"].startswith("10.97.")

    kubectl(server, "label", "pod", "web", "-n", "smoke", "tier=front")
    assert kubectl(server, "get", "pods", "-n", "smoke", "-l", "tier in (front)", "-o", "name").stdout.strip() == \
        "pod/web"
    kubectl(server, "patch", "pod", "web", "-n", "smoke", "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"podIP": "10.244.1.7", "conditions": [{"type": "Ready", "status": "True"}]}}))
    deadline = time.monotonic() + 10
    while True:
        slices = json.loads(kubectl(server, "get", "endpointslices", "-n", "smoke", "-o", "json").stdout)["items"]
        addresses = [a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]]
        if addresses == ["10.244.1.7"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert addresses == ["10.244.1.7"] and slices[0]["ports"][0]["port"] == 8080

    kubectl(server, "replace", "-f", str(manifest))
    bad = kubectl(server, "create", "namespace", "Bad_Name", ok=False)
    assert bad.returncode != 0 and 'metadata.name: Invalid value: "Bad_Name"' in bad.stderr
    kubectl(server, "delete", "-f", str(manifest))
    assert "No resources found" in kubectl(server, "get", "pods", "-A").stderr
