"""Bad input refused where it enters (issue 11): through `propolis sandbox apply` and straight at the sandbox
API with an aiohttp client. The API validates with the k8s-watcher's validators and answers like
kube-apiserver: 422 with a `Status` (kind Status, status Failure, reason Invalid, details.causes[].field naming
the field), 413 RequestEntityTooLarge over etcd's 1.5 MiB; nothing refused is stored. A multi-document apply
reports every document's outcome like kubectl and exits non-zero when one failed."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS

pytestmark = pytest.mark.root
NS = "default"
NP_PATH = KINDS["NetworkPolicy"].path(NS)
CNP_PATH = KINDS["CiliumNetworkPolicy"].path(NS)
LONG_LABEL = "a" * 10_000
TWO_MIB = 2 * 1024 * 1024


def netpol(name: str, *, cidr: str = "10.0.0.0/24", port: Any = 8080, labels: dict | None = None,
           annotations: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {"app": "web"}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}], "ports": [{"protocol": "TCP", "port": port}]}]}}


def service(name: str, cluster_ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": "web"}, "ports": [{"port": 80}]}}


BAD = {  # case -> (object, field the refusal must name, words it must say)
    "cidr /33": (netpol("cidr33", cidr="10.0.0.0/33"), "spec.ingress[0].from[0].ipBlock.cidr", "10.0.0.0/33"),
    "port 0": (netpol("port0", port=0), "spec.ingress[0].ports[0].port", "between 1 and 65535"),
    "10k label": (netpol("longlabel", labels={"app": LONG_LABEL}), "metadata.labels",
                  "must be no more than 63 characters"),
}


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=1, services="none") as state:
        yield state


@pytest.fixture
async def http(sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.apiserver_url) as session:
        yield session


async def absent(http: aiohttp.ClientSession, path: str) -> bool:
    async with http.get(path) as resp:
        return resp.status == 404


def cli_apply(sandbox, tmp_path: Path, docs: list[dict]) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "apply", "--name",
                           sandbox.config["name"], "-f", str(manifest)], capture_output=True, text=True, timeout=60)


# --- straight at the API ----------------------------------------------------------------------

@pytest.mark.parametrize("case", BAD)
async def test_api_answers_422_status_naming_the_field(http, case):
    obj, field, words = BAD[case]
    async with http.post(NP_PATH, json=obj) as resp:
        status, body = resp.status, await resp.json()
    assert status == 422, body
    assert (body["kind"], body["status"], body["reason"], body["code"]) == ("Status", "Failure", "Invalid", 422)
    assert field in [c["field"] for c in body["details"]["causes"]], body
    assert words in body["message"]
    assert len(body["message"]) < 1000  # never echoes the whole 10 KB value
    assert await absent(http, f"{NP_PATH}/{obj['metadata']['name']}")


async def test_api_accepts_cnp_port_zero_for_its_own_peers(http):
    cnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "all-ports"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                 "toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}]}]}]}}
    async with http.post(CNP_PATH, json=cnp) as resp:
        assert resp.status == 201, await resp.text()
    async with http.delete(f"{CNP_PATH}/all-ports") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("size", [TWO_MIB, 4 * 1024 * 1024])
async def test_api_refuses_objects_over_etcds_limit_with_413(http, size):
    obj = netpol("huge", annotations={"blob": "x" * size})
    async with http.post(NP_PATH, json=obj) as resp:
        status, body = resp.status, await resp.json()
    assert status == 413, body
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "RequestEntityTooLarge", 413)
    assert await absent(http, f"{NP_PATH}/huge")


async def test_api_refuses_an_update_that_breaks_a_policy(http):
    async with http.post(NP_PATH, json=netpol("good")) as resp:
        assert resp.status == 201
    patch = {"spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}}
    async with http.patch(f"{NP_PATH}/good", json=patch,
                          headers={"Content-Type": "application/merge-patch+json"}) as resp:
        status, body = resp.status, await resp.json()
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec.ingress[0].from[0].ipBlock.cidr"
    async with http.get(f"{NP_PATH}/good") as resp:
        assert (await resp.json())["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"] == "10.0.0.0/24"
    async with http.delete(f"{NP_PATH}/good") as resp:
        assert resp.status == 200


# --- through the CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", BAD)
async def test_cli_refuses_naming_the_field(sandbox, http, tmp_path, case):
    obj, field, words = BAD[case]
    proc = cli_apply(sandbox, tmp_path, [obj])
    assert proc.returncode != 0
    assert field in proc.stderr and words in proc.stderr, proc.stderr
    assert len(proc.stderr) < 2000 and "Traceback" not in proc.stderr
    assert await absent(http, f"{NP_PATH}/{obj['metadata']['name']}")


async def test_cli_refuses_an_object_over_etcds_limit(sandbox, http, tmp_path):
    proc = cli_apply(sandbox, tmp_path, [netpol("huge", annotations={"blob": "x" * TWO_MIB})])
    assert proc.returncode != 0 and "too large" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert await absent(http, f"{NP_PATH}/huge")


async def test_cli_multi_document_apply_reports_every_outcome(sandbox, http, tmp_path):
    """Document 3 fails only at write time (its ClusterIP is taken by document 2 a moment earlier): 1 and 2
    are applied and said so, 3's failure is reported with the API's message, and the exit code is 1."""
    ip = str(ipaddress.ip_network(sandbox.config["service_cidr"]).network_address + 200)
    docs = [netpol("multi-a"), service("multi-b", ip), service("multi-c", ip)]
    proc = cli_apply(sandbox, tmp_path, docs)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "networkpolicy.networking.k8s.io/multi-a created" in proc.stdout.splitlines()
    assert "service/multi-b created" in proc.stdout.splitlines()
    assert "multi-c" not in proc.stdout
    assert "document 3 (Service default/multi-c)" in proc.stderr and "already allocated" in proc.stderr
    assert await absent(http, f"{KINDS['Service'].path(NS)}/multi-c")

    again = cli_apply(sandbox, tmp_path, docs[:2])
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["networkpolicy.networking.k8s.io/multi-a unchanged",
                                         "service/multi-b unchanged"]
    changed = netpol("multi-a", cidr="10.1.0.0/24")
    third = cli_apply(sandbox, tmp_path, [changed])
    assert third.stdout.splitlines() == ["networkpolicy.networking.k8s.io/multi-a configured"], third.stderr
    for path in (f"{NP_PATH}/multi-a", f"{KINDS['Service'].path(NS)}/multi-b"):
        async with http.delete(path) as resp:
            assert resp.status == 200
