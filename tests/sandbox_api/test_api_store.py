"""The sandbox API store: resourceVersions, validation messages, history/410, selector transitions on watches,
allocators and the EndpointSlice controller's rules (without HTTP; the client-driven tests are in
integration/sandbox_api)."""

from __future__ import annotations

from typing import Any

import pytest

from propolis_sandbox.api_controllers import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    EndpointSliceController,
    PodUpdateRules,
    ServiceAllocator,
    desired_slices,
)
from propolis_sandbox.api_resources import BY_KIND
from propolis_sandbox.api_selectors import FieldSelector, LabelSelector, parse_label_selector
from propolis_sandbox.api_store import ApiStatusError, Store

POD, SVC, NS, SLICE = BY_KIND["Pod"], BY_KIND["Service"], BY_KIND["Namespace"], BY_KIND["EndpointSlice"]
CNP, CCNP = BY_KIND["CiliumNetworkPolicy"], BY_KIND["CiliumClusterwideNetworkPolicy"]


def pod(name: str, labels: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "c", "image": "echo", "ports": ports or []}]}}


@pytest.fixture
def store() -> Store:
    s = Store(history_limit=50)
    s.admissions += [ServiceAllocator(s, "10.96.0.0/16"), PodUpdateRules()]
    s.create(NS, None, {"metadata": {"name": "default"}})
    return s


def test_resource_versions_are_global_and_increasing(store: Store) -> None:
    a = store.create(POD, "default", pod("a"))
    s = store.create(SVC, "default", {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert int(s["metadata"]["resourceVersion"]) == int(a["metadata"]["resourceVersion"]) + 1
    assert a["metadata"]["uid"] and a["metadata"]["creationTimestamp"] and a["metadata"]["generation"] == 1
    assert a["status"] == {"phase": "Pending", "qosClass": "BestEffort"}


def test_invalid_name_message_names_the_field(store: Store) -> None:
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", pod("Bad_Name"))
    assert err.value.code == 422 and err.value.reason == "Invalid"
    assert 'metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain' in err.value.message
    assert err.value.details["causes"][0]["field"] == "metadata.name"


def test_duplicate_container_port_is_refused(store: Store) -> None:
    body = pod("dup")
    body["spec"]["containers"].append({"name": "d", "image": "x", "ports": [{"containerPort": 80}]})
    body["spec"]["containers"][0]["ports"] = [{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}]
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", body)
    fields = [c["field"] for c in err.value.details["causes"]]
    assert fields == ["spec.containers[1].ports[0].containerPort"]


def test_pod_required_fields(store: Store) -> None:
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}})
    assert "spec.containers[0].image: Required value" in err.value.message
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", {"metadata": {"name": "p"}, "spec": {}})
    assert "spec.containers: Required value" in err.value.message


def test_cilium_policies_structural_check_only_when_policy_validation_is_off(store: Store) -> None:
    store.validate_policies = False
    store.create(CNP, "default", {"metadata": {"name": "p"}, "spec": {"anything": ["goes"]}})
    store.create(CCNP, None, {"metadata": {"name": "c"}, "specs": [{"endpointSelector": {}}]})
    with pytest.raises(ApiStatusError) as err:
        store.create(CNP, "default", {"metadata": {"name": "q"}, "spec": ["not", "an", "object"]})
    assert err.value.details["causes"][0]["field"] == "spec"
    with pytest.raises(ApiStatusError) as err:
        store.create(CCNP, None, {"metadata": {"name": "r"}, "specs": {"x": 1}})
    assert err.value.details["causes"][0]["field"] == "specs"


def test_create_in_missing_namespace_is_not_found(store: Store) -> None:
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "nowhere", pod("a"))
    assert err.value.code == 404 and err.value.message == 'namespaces "nowhere" not found'


async def test_watch_replays_after_rv_and_410_after_window(store: Store) -> None:
    a = store.create(POD, "default", pod("a"))
    rv = a["metadata"]["resourceVersion"]
    store.create(POD, "default", pod("b"))
    w = store.watch(POD, None, LabelSelector(), FieldSelector(), rv)
    etype, obj = w.queue.get_nowait()
    assert (etype, obj["metadata"]["name"]) == ("ADDED", "b") and w.queue.empty()
    for i in range(60):  # overflow the 50-event window
        store.create(POD, "default", pod(f"p{i}"))
    with pytest.raises(ApiStatusError) as err:
        store.watch(POD, None, LabelSelector(), FieldSelector(), rv)
    assert err.value.code == 410 and err.value.reason == "Expired"


async def test_selector_transitions_become_added_and_deleted(store: Store) -> None:
    store.create(POD, "default", pod("a", {"app": "x"}))
    w = store.watch(POD, "default", parse_label_selector("app=x"), FieldSelector(), str(store.rv))
    current = store.get(POD, "default", "a")
    current["metadata"]["labels"] = {"app": "y"}
    current = store.update(POD, "default", "a", current)
    current["metadata"]["labels"] = {"app": "x"}
    store.update(POD, "default", "a", current)
    assert [w.queue.get_nowait()[0] for _ in range(2)] == ["DELETED", "ADDED"]


def test_stale_update_conflicts_and_noop_keeps_rv(store: Store) -> None:
    a = store.create(POD, "default", pod("a"))
    store.update(POD, "default", "a", {**a, "metadata": {**a["metadata"], "labels": {"v": "1"}}})
    with pytest.raises(ApiStatusError) as err:
        store.update(POD, "default", "a", a)
    assert err.value.code == 409 and err.value.reason == "Conflict"
    fresh = store.get(POD, "default", "a")
    assert store.update(POD, "default", "a", fresh)["metadata"]["resourceVersion"] == fresh["metadata"]["resourceVersion"]


def test_pod_update_ignores_status_and_status_update_ignores_spec(store: Store) -> None:
    a = store.create(POD, "default", pod("a"))
    a["status"] = {"phase": "Running"}
    assert store.update(POD, "default", "a", a)["status"]["phase"] == "Pending"
    b = store.get(POD, "default", "a")
    b["status"] = {"phase": "Running", "podIP": "10.0.0.1"}
    b["metadata"]["labels"] = {"sneaky": "1"}
    out = store.update(POD, "default", "a", b, subresource="status")
    assert out["status"]["podIP"] == "10.0.0.1" and not out["metadata"].get("labels")


def test_cluster_ip_allocation(store: Store) -> None:
    s1 = store.create(SVC, "default", {"metadata": {"name": "s1"}, "spec": {"ports": [{"port": 80}]}})
    assert s1["spec"]["clusterIP"] == "10.96.0.1" and s1["spec"]["clusterIPs"] == ["10.96.0.1"]
    s2 = store.create(SVC, "default", {"metadata": {"name": "s2"}, "spec": {"clusterIP": "10.96.3.3",
                                                                            "ports": [{"port": 80}]}})
    assert s2["spec"]["clusterIP"] == "10.96.3.3"
    with pytest.raises(ApiStatusError, match="already allocated"):
        store.create(SVC, "default", {"metadata": {"name": "s3"}, "spec": {"clusterIP": "10.96.3.3",
                                                                           "ports": [{"port": 80}]}})
    with pytest.raises(ApiStatusError, match="not in the valid range"):
        store.create(SVC, "default", {"metadata": {"name": "s3"}, "spec": {"clusterIP": "10.1.0.1",
                                                                           "ports": [{"port": 80}]}})
    headless = store.create(SVC, "default", {"metadata": {"name": "h"}, "spec": {"clusterIP": "None",
                                                                                 "ports": [{"port": 80}]}})
    assert headless["spec"]["clusterIP"] == "None"
    np = store.create(SVC, "default", {"metadata": {"name": "np"}, "spec": {"type": "NodePort",
                                                                            "ports": [{"port": 80}]}})
    assert 30000 <= np["spec"]["ports"][0]["nodePort"] <= 32767
    store.delete(SVC, "default", "s1")
    again = store.create(SVC, "default", {"metadata": {"name": "s4"}, "spec": {"ports": [{"port": 80}]}})
    assert again["spec"]["clusterIP"] == "10.96.0.1"  # released with its Service
    # replace without clusterIP keeps the allocated one; changing it is refused
    np["spec"].pop("clusterIP")
    np["spec"].pop("clusterIPs")
    np["metadata"].pop("resourceVersion")
    kept = store.update(SVC, "default", "np", np)
    assert kept["spec"]["clusterIP"] and kept["spec"]["ports"][0]["nodePort"] == np["spec"]["ports"][0]["nodePort"]
    kept["spec"]["clusterIP"] = "10.96.9.9"
    with pytest.raises(ApiStatusError, match="immutable"):
        store.update(SVC, "default", "np", kept)


def ready(store: Store, name: str, ip: str, ok: bool = True) -> None:
    p = store.get(POD, "default", name)
    p["status"] = {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ok else "False"}]}
    store.update(POD, "default", name, p, subresource="status")


def test_desired_slices_named_ports_split_by_number(store: Store) -> None:
    store.create(POD, "default", pod("a", {"app": "w"}, [{"name": "http", "containerPort": 8080}]))
    store.create(POD, "default", pod("b", {"app": "w"}, [{"name": "http", "containerPort": 9090}]))
    store.create(POD, "default", pod("c", {"app": "w"}, [{"name": "http", "containerPort": 8080}]))
    store.create(POD, "default", pod("other", {"app": "z"}, [{"name": "http", "containerPort": 8080}]))
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("other", "10.0.0.9")):
        ready(store, name, ip)
    ready(store, "c", "10.0.0.3", ok=False)
    svc = store.create(SVC, "default", {"metadata": {"name": "w"}, "spec": {"selector": {"app": "w"},
                                                                            "ports": [{"name": "web", "port": 80,
                                                                                       "targetPort": "http"}]}})
    slices = desired_slices(svc, list(store.all_objects(POD)))
    by_port = {ports[0]["port"]: endpoints for ports, endpoints in slices}
    assert set(by_port) == {8080, 9090}
    assert [(e["addresses"], e["conditions"]["ready"]) for e in by_port[8080]] == [
        (["10.0.0.1"], True), (["10.0.0.3"], False)]
    assert by_port[9090][0]["targetRef"]["name"] == "b"


async def test_endpointslice_controller_sync(store: Store) -> None:
    controller = EndpointSliceController(store)
    store.create(POD, "default", pod("a", {"app": "w"}, [{"name": "http", "containerPort": 8080}]))
    ready(store, "a", "10.0.0.1")
    store.create(SVC, "default", {"metadata": {"name": "w"}, "spec": {"selector": {"app": "w"},
                                                                      "ports": [{"port": 80, "targetPort": "http"}]}})
    controller.sync("default", "w")
    controller.sync("default", "w")  # idempotent
    slices = list(store.all_objects(SLICE))
    assert len(slices) == 1
    labels = slices[0]["metadata"]["labels"]
    assert labels[SERVICE_NAME_LABEL] == "w" and labels[MANAGED_BY_LABEL] == CONTROLLER_NAME
    assert slices[0]["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]
    store.delete(SVC, "default", "w")
    controller.sync("default", "w")
    assert list(store.all_objects(SLICE)) == []


async def test_graceful_pod_deletion_on_an_existing_node(store: Store) -> None:
    store.create(BY_KIND["Node"], None, {"metadata": {"name": "n1"}})
    store.create(POD, "default", {**pod("g"), "spec": {**pod("g")["spec"], "nodeName": "n1"}})
    store.create(POD, "default", pod("unbound"))
    terminating = store.delete(POD, "default", "g")
    assert terminating["metadata"]["deletionTimestamp"] and terminating["metadata"]["deletionGracePeriodSeconds"] == 30
    assert store.find(POD, "default", "g") is not None
    store.delete(POD, "default", "g", grace_period=0)  # what the kubelet does once the pod is torn down
    assert store.find(POD, "default", "g") is None
    store.delete(POD, "default", "unbound")  # no node: gone at once
    assert store.find(POD, "default", "unbound") is None
    store.close()


def test_namespace_deletion_removes_contents(store: Store) -> None:
    store.create(NS, None, {"metadata": {"name": "team"}})
    store.create(POD, "team", pod("a"))
    store.create(CNP, "team", {"metadata": {"name": "p"}, "spec": {"endpointSelector": {}}})
    store.delete(NS, None, "team")  # outside an event loop the namespace controller runs at once
    assert store.find(NS, None, "team") is None and list(store.all_objects(CNP)) == []
    assert list(store.all_objects(POD)) == []


def test_bad_label_value_is_refused(store: Store) -> None:
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", pod("l", {"app": "has space"}))
    assert err.value.details["causes"][0]["field"] == "metadata.labels" and '"has space"' in err.value.message


def test_a_10k_label_value_is_refused_naming_the_limit_not_echoing_it(store: Store) -> None:
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", pod("l", {"app": "v" * 10_000}))
    assert err.value.code == 422 and "must be no more than 63 characters" in err.value.message
    assert len(err.value.message) < 500


def test_policies_get_the_watchers_validation_422_naming_the_field(store: Store) -> None:
    np = {"metadata": {"name": "np"},
          "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}],
                                                   "ports": [{"port": 0}]}]}}
    with pytest.raises(ApiStatusError) as err:
        store.create(BY_KIND["NetworkPolicy"], "default", np)
    status = err.value.status()
    assert (status["kind"], status["status"], status["reason"], status["code"]) == ("Status", "Failure", "Invalid", 422)
    assert status["details"]["causes"][0]["field"] == "spec.ingress[0].ports[0].port"
    np["spec"]["ingress"][0]["ports"] = [{"port": 80}]
    with pytest.raises(ApiStatusError) as err:
        store.create(BY_KIND["NetworkPolicy"], "default", np)
    assert err.value.details["causes"][0]["field"] == "spec.ingress[0].from[0].ipBlock.cidr"
    with pytest.raises(ApiStatusError) as err:
        store.create(CNP, "default", {"metadata": {"name": "c"}, "spec": {
            "endpointSelector": {}, "ingress": [{"fromEndpoints": [{}], "fromCIDR": ["10.0.0.0/8"]}]}})
    assert err.value.details["causes"][0]["field"] == "spec.ingress[0].fromCIDR"
    assert list(store.all_objects(CNP)) == [] and list(store.all_objects(BY_KIND["NetworkPolicy"])) == []


def test_objects_over_etcds_request_limit_are_refused_with_413(store: Store) -> None:
    big = pod("big")
    big["metadata"]["annotations"] = {"blob": "x" * (1536 * 1024)}
    with pytest.raises(ApiStatusError) as err:
        store.create(POD, "default", big)
    assert err.value.code == 413 and err.value.reason == "RequestEntityTooLarge"
    store.create(POD, "default", pod("small"))
    grown = store.get(POD, "default", "small")
    grown["metadata"]["annotations"] = {"blob": "x" * (1536 * 1024)}
    with pytest.raises(ApiStatusError) as err:
        store.update(POD, "default", "small", grown)
    assert err.value.code == 413
