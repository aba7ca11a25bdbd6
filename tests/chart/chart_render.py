"""The chart under test, rendered by the real helm (scripts/setup.sh installs it into the venv)."""

from __future__ import annotations

import importlib.util
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from propolis_sandbox.testing.tools import required_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "propolis"

#: The issue's "done when" install: every feature on.
ALL_FEATURES = ["kubeProxyReplacement=true", "encryption.enabled=true", "encryption.type=wireguard",
                "hubble.relay.enabled=true", "clustermesh.useAPIServer=true", "hubble.ui.enabled=true",
                "hubble.export.static.enabled=true", "hubble.metrics.enabled={dns,drop,flow:sourceContext=namespace}",
                "nats.tls.enabled=true", "k8sServiceHost=10.0.0.1", "k8sServicePort=6443",
                "loadBalancer.algorithm=maglev", "devices={eth0}", "policyEnforcementMode=always", "socketLB.enabled=true",
                "cluster.name=mesh-1", "cluster.id=7", "image.useDigest=true", "image.digest=sha256:" + "0" * 64]


tool = required_tool  # a tool the tests need; missing = set-up is broken, which must fail (never skip) in CI


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


class StrictLoader(yaml.SafeLoader):
    """YAML as the API server decodes it (strict): a key twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {twice}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


@cache
def _render(sets: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    args = ["template", "propolis", str(CHART), "--namespace", "kube-system", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return tuple(d for d in yaml.load_all(helm(*args).stdout, Loader=StrictLoader) if d)


def render(*sets: str) -> list[dict[str, Any]]:
    return list(_render(tuple(sets)))


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Service name -> its Deployment or DaemonSet."""
    return {d["metadata"]["labels"]["app.kubernetes.io/name"]: d for d in docs
            if d["kind"] in ("Deployment", "DaemonSet")}


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("helm_generate", ROOT / "helm" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
