"""The cilium.io CRDs' structural schemas accept every policy the project (and the seed) uses, reject malformed ones.

Validation is what the API server does with `kubectl apply --validate=strict`: types, enums, patterns,
required fields, and unknown fields refused (except where the schema keeps them:
x-kubernetes-preserve-unknown-fields).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_render import CHART, ROOT

from propolis.connectivity.scenarios import SCENARIOS

SEED = ROOT.parent / "shared" / "seed"
KINDS = {"CiliumNetworkPolicy": "ciliumnetworkpolicies", "CiliumClusterwideNetworkPolicy":
         "ciliumclusterwidenetworkpolicies", "CiliumCIDRGroup": "ciliumcidrgroups"}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's OpenAPI schema as strict field validation applies it."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CHART / "crds" / f"{KINDS[kind]}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(obj["kind"]).iter_errors(obj)]


def load_test_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"policy_examples_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_policies() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    parse_tests = load_test_module(ROOT / "tests" / "policy" / "test_policy_parse.py")
    for i, spec in enumerate(parse_tests.GOOD_CNP_SPECS):
        found.append((f"test_policy_parse-{i}", parse_tests.cnp(copy.deepcopy(spec))))
        found.append((f"test_policy_parse-ccnp-{i}", parse_tests.cnp(specs=[copy.deepcopy(spec)],
                                                                    kind="CiliumClusterwideNetworkPolicy", ns=None)))
    for path in sorted((ROOT / "libs" / "propolis_sandbox" / "demo" / "manifests").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in KINDS:
                found.append((f"demo-{path.name}", doc))
    for scenario in SCENARIOS:
        for doc in scenario.policies:
            if doc.get("kind") in KINDS:
                found.append((f"connectivity-{scenario.name}-{doc['metadata']['name']}", doc))
    return found


def seed_policies() -> list[tuple[str, dict[str, Any]]]:
    """Every cilium.io document in the seed's text: from its apiVersion line to the next blank line."""
    found = []
    for path in sorted(SEED.glob("*.txt")) if SEED.is_dir() else []:
        for match in re.finditer(r"^apiVersion: cilium\.io/v2\n(?:.+\n)+", path.read_text(), re.M):
            doc = yaml.safe_load(match.group(0))
            found.append((f"seed-{doc['metadata']['name']}", doc))
    return found


def test_every_project_policy_is_found() -> None:
    names = [name for name, _ in project_policies()]
    assert any(n.startswith("demo-") for n in names) and any(n.startswith("connectivity-") for n in names)
    assert len(names) > 40


@pytest.mark.parametrize("name,doc", project_policies(), ids=lambda v: v if isinstance(v, str) else "")
def test_crd_accepts_the_projects_policies(name: str, doc: dict[str, Any]) -> None:
    assert errors(doc) == []


@pytest.mark.skipif(not SEED.is_dir(), reason="the seed (../shared/seed) is not beside this checkout")
def test_crd_accepts_the_seed_examples() -> None:
    seeds = seed_policies()
    assert len(seeds) >= 4
    for name, doc in seeds:
        assert errors(doc) == [], name


def cnp(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "n"},
            "spec": spec}


EP = {"matchLabels": {"app": "api"}}
MALFORMED = [
    ({"endpointSelector": EP, "ingress": [{"fromEntities": ["wrold"]}]}, "ingress/0/fromEntities/0"),
    ({"endpointSelector": EP, "ingress": [{"fromEndpoint": [EP]}]}, "'fromEndpoint' was unexpected"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "HTTP"}]}]}]},
     "protocol"),
    ({"endpointSelector": EP, "egress": [{"toCIDR": ["10.0.0.0/8 "]}]}, "toCIDR/0"),
    ({"endpointSelector": EP, "egress": [{"toCIDRSet": [{"cidr": "example.com"}]}]}, "toCIDRSet/0/cidr"),
    ({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Contains"}]}}, "operator"),
    ({"endpointSelector": {"matchLabels": {"app": 3}}}, "matchLabels/app"),
    ({"endpointSelector": EP, "ingress": {"fromEndpoints": [EP]}}, "ingress: {'fromEndpoints'"),
    ({"endpointSelector": EP, "ingressDeny": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": "GET"}}]}]},
     "rules/http"),
    ({"endpointSelector": EP, "egressDeny": [{"toFQDNs": [{"matchName": "a.com"}]}]}, "'toFQDNs' was unexpected"),
    ({"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"family": "IPv4"}]}]}]}, "'type' is a required"),
    ({"endpointSelector": EP, "enableDefaultDeny": {"ingress": "yes"}}, "enableDefaultDeny/ingress"),
]


@pytest.mark.parametrize("spec,where", MALFORMED, ids=[w for _, w in MALFORMED])
def test_crd_rejects_malformed_policies(spec: dict[str, Any], where: str) -> None:
    found = errors(cnp(spec))
    assert found and any(where in e for e in found), found


def test_cidr_group_schema() -> None:
    group = {"apiVersion": "cilium.io/v2", "kind": "CiliumCIDRGroup", "metadata": {"name": "g"},
             "spec": {"externalCIDRs": ["10.0.0.0/8", "2001:db8::/32"]}}
    assert errors(group) == []
    assert errors({**group, "spec": {}})  # externalCIDRs is required
    assert errors({**group, "spec": {"externalCIDRs": ["ten/8"]}})
