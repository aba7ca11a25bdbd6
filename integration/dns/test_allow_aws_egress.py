"""The seed's `allow-aws-egress` (allow-aws-egress.yaml, verbatim) with real DNS and real connections.

Under the policy the api pod still resolves every name (its DNS rule allows kube-dns, reached through the
kube-dns ClusterIP, now through its node's dns-proxy), reaches `s3.amazonaws.com` (toFQDNs) and no world
host it is not allowed to (example.org); an unselected pod is unaffected. The proxy's own behaviour
(REFUSED, restarts, Hubble) is `test_dns_proxy_fqdn.py`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from
from propolis_sandbox.world import WORLD_ZONE

pytestmark = pytest.mark.root
NS = "production"
POLICY = Path(__file__).with_name("allow-aws-egress.yaml")


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        docs = documents_from(NS, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}] + [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
             "spec": {"nodeName": node["name"], "containers": [{"name": "c", "image": "echo",
                                                                 "ports": [{"containerPort": 8080}]}]}}
            for name, node in (("api", state.nodes[0]), ("other", state.nodes[0]))])
        asyncio.run(cluster.apply_documents(state, docs))
        asyncio.run(cluster.wait_running(state, 2, namespace=NS))
        asyncio.run(cluster.wait_running(state, 1, namespace="kube-system", timeout=60))
        yield state


def probe(state, source: str, target: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name",
                           state.config["name"], f"{NS}/{source}", target, "--port", "443", "--timeout", "1",
                           "-o", "json"], capture_output=True, text=True, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr})


def test_seed_policy_resolves_but_denies_what_it_does_not_allow(sandbox):
    for name in ("s3.amazonaws.com", "api.stripe.com", "example.org"):  # before: the world answers everyone
        assert probe(sandbox, "api", name)[1]["connected"], name
    subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "apply", "--name", sandbox.config["name"],
                    "-f", str(POLICY)], check=True, capture_output=True, timeout=60)
    asyncio.run(cluster.wait(sandbox, timeout=60))
    code, out = probe(sandbox, "api", "example.org")
    assert code == 1 and not out["connected"], out
    assert out["addresses"] == list(WORLD_ZONE["example.org."].addresses), out  # DNS still allowed (rules.dns "*")
    code, out = probe(sandbox, "api", "s3.amazonaws.com")
    assert sorted(out["addresses"]) == sorted(WORLD_ZONE["s3.amazonaws.com."].addresses), out
    assert code == 0 and out["connected"], out
    assert probe(sandbox, "other", "example.org")[1]["connected"]  # not selected by the policy
