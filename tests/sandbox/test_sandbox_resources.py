"""Validation of sandbox YAML documents: bad input is refused naming document and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from propolis.errors import ValidationError
from propolis.k8s.kinds import ALL_KINDS
from propolis_sandbox.api_resources import BY_KIND, RESOURCES
from propolis_sandbox.api_store import ApiStatusError, Store
from propolis_sandbox.resources import KINDS, load_documents, resolve_kind, validate_documents

GOOD_POD = """
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec:
  containers:
  - name: c
    image: agnhost
    ports:
    - {containerPort: 80, name: http}
    - {containerPort: 80, protocol: UDP, name: dns}
"""


def write(tmp_path: Path, text: str, name: str = "in.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(tmp_path: Path, text: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_documents(load_documents([write(tmp_path, text)]))
    return info.value


def test_good_multi_document_file_loads_in_order(tmp_path: Path) -> None:
    svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  ports: [{port: 80}]\n"
    docs = load_documents([write(tmp_path, GOOD_POD + "---\n" + svc)])
    validate_documents(docs)
    assert [(d.kind.kind, d.namespace, d.name, d.index) for d in docs] == [("Pod", "x", "a", 1), ("Service", "x", "web", 2)]


def test_unknown_kind_names_document(tmp_path: Path) -> None:
    err = refused(tmp_path, GOOD_POD + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    assert "document 2" in str(err) and "Deployment" in str(err) and err.field.endswith("kind")


def test_invalid_name(tmp_path: Path) -> None:
    err = refused(tmp_path, GOOD_POD.replace("name: a,", "name: Bad_Name,"))
    assert "metadata.name" in err.field and "document 1" in err.field


def test_duplicate_container_ports(tmp_path: Path) -> None:
    text = GOOD_POD + "    - {containerPort: 80, name: again}\n"
    err = refused(tmp_path, text)
    assert "spec.containers[0].ports[2].containerPort" in err.field and err.reason.startswith('Duplicate value: "80/TCP"')


def test_second_bad_document_refuses_whole_file(tmp_path: Path) -> None:
    bad_svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 70000}]\n"
    err = refused(tmp_path, GOOD_POD + "---\n" + bad_svc)
    assert "document 2 (Service default/web)" in err.field and "spec.ports[0].port" in err.field


def test_wrong_api_version_and_duplicates(tmp_path: Path) -> None:
    assert "apiVersion" in refused(tmp_path, GOOD_POD.replace("apiVersion: v1", "apiVersion: v2")).field
    assert "defined twice" in str(refused(tmp_path, GOOD_POD + "---\n" + GOOD_POD))


def test_kind_aliases() -> None:
    assert resolve_kind("po") is KINDS["Pod"]
    assert resolve_kind("svc") is KINDS["Service"]
    assert resolve_kind("cnp") is KINDS["CiliumNetworkPolicy"]
    assert resolve_kind("ccnp").path(None) == "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies"
    assert KINDS["EndpointSlice"].path("x", "s") == "/apis/discovery.k8s.io/v1/namespaces/x/endpointslices/s"
    with pytest.raises(ValidationError):
        resolve_kind("deployments")


BAD_DOCUMENTS = {
    "pod name": GOOD_POD.replace("name: a,", "name: Bad_Name,"),
    "service name": "apiVersion: v1\nkind: Service\nmetadata: {name: 1web, namespace: x}\nspec:\n  ports: [{port: 80}]\n",
    "service port": "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  ports: [{port: 0}]\n",
    "duplicate port": GOOD_POD + "    - {containerPort: 80, name: again}\n",
    "label value": GOOD_POD.replace("labels: {app: a}", "labels: {app: 'a b'}"),
    "cidr group": "apiVersion: cilium.io/v2\nkind: CiliumCIDRGroup\nmetadata: {name: g}\n"
                  "spec: {externalCIDRs: [not-a-cidr]}\n",
    "policy": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: x}\n"
              "spec: {endpointSelector: {}, ingress: [{fromCIDR: [10.0.0.0/33]}]}\n",
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_apply_and_the_api_server_refuse_alike(tmp_path: Path, case: str) -> None:
    """One set of validators: `sandbox apply` names the same field, with the same words, as the API server's 422."""
    doc = load_documents([write(tmp_path, BAD_DOCUMENTS[case])])[0]
    err = refused(tmp_path, BAD_DOCUMENTS[case])
    store = Store(history_limit=10)
    store.create(BY_KIND["Namespace"], None, {"metadata": {"name": "x"}})
    with pytest.raises(ApiStatusError) as api_err:
        store.create(BY_KIND[doc.kind.kind], doc.namespace, doc.body)
    assert api_err.value.code == 422
    cause = api_err.value.details["causes"][0]
    assert err.field.endswith(": " + cause["field"]) and err.reason == cause["message"]


def test_the_api_serves_the_product_kind_table() -> None:
    """The sandbox API server and `apply` read propolis.k8s.kinds; nothing re-declares a group or plural."""
    assert {r.definition for r in RESOURCES} == set(ALL_KINDS)
    assert set(KINDS.values()) <= set(ALL_KINDS)
    assert BY_KIND["Pod"].base_path("x") == "/api/v1/namespaces/x/pods"
    assert BY_KIND["CiliumNetworkPolicy"].short_names == ("cnp", "ciliumnp") == resolve_kind("ciliumnp").short_names
