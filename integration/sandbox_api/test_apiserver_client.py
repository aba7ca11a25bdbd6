"""The sandbox API endpoint driven by kubernetes-asyncio, the client the k8s-watcher and kubelet use:
CRUD for every kind, selectors, watch semantics (resume, bookmarks, 410 after compaction), the status
subresource, EndpointSlices following pods, and errors that name the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from propolis_sandbox.apiserver import URL_FILE, ApiServer

MERGE = "application/merge-patch+json"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, client.ApiClient]]:
    async with ApiServer(run_dir=tmp_path / "run", bookmark_interval=0.2, history_limit=1000) as srv:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(srv.kubeconfig_path), client_configuration=configuration)
        async with client.ApiClient(configuration) as api_client:
            yield srv, api_client


def pod_body(name: str, labels: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None,
             node: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "echo", "ports": ports or []}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


async def test_run_dir_files_and_discovery(api: tuple[ApiServer, client.ApiClient]) -> None:
    srv, api_client = api
    assert (srv.run_dir / URL_FILE).read_text().strip() == srv.url
    kubeconfig = yaml.safe_load(srv.kubeconfig_path.read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == srv.url
    version = await client.VersionApi(api_client).get_code()
    assert version.major == "1"
    groups = await client.ApisApi(api_client).get_api_versions()
    assert {"cilium.io", "discovery.k8s.io", "networking.k8s.io"} <= {g.name for g in groups.groups}
    resources = await client.CoreV1Api(api_client).get_api_resources()
    pods = next(r for r in resources.resources if r.name == "pods")
    assert pods.namespaced and pods.kind == "Pod" and "watch" in pods.verbs and pods.short_names == ["po"]
    assert any(r.name == "pods/status" for r in resources.resources)
    namespaces = await client.CoreV1Api(api_client).list_namespace()
    assert {"default", "kube-system"} <= {n.metadata.name for n in namespaces.items}


async def test_crud_core_kinds(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespace({"metadata": {"name": "team-a"}})
    created = await core.create_namespaced_pod("team-a", pod_body("web", {"app": "web"}))
    assert created.metadata.uid and created.status.phase == "Pending"
    got = await core.read_namespaced_pod("web", "team-a")
    assert got.metadata.resource_version == created.metadata.resource_version
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("team-a", pod_body("web"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    patched = await core.patch_namespaced_pod("web", "team-a", {"metadata": {"labels": {"tier": "front"}}},
                                              _content_type=MERGE)
    assert patched.metadata.labels == {"app": "web", "tier": "front"}
    smp = await core.patch_namespaced_pod("web", "team-a", {"metadata": {"annotations": {"a": "1"}}})
    assert smp.metadata.annotations == {"a": "1"}  # default content type: strategic merge patch
    body = (await core.read_namespaced_pod("web", "team-a")).to_dict()
    stale = dict(body["metadata"], resource_version=created.metadata.resource_version)
    with pytest.raises(ApiException) as err:
        await core.replace_namespaced_pod("web", "team-a", {**api_client.sanitize_for_serialization(
            client.V1Pod(**{**body, "metadata": client.V1ObjectMeta(**stale)}))})
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"
    generated = await core.create_namespaced_pod("team-a", {**pod_body(""), "metadata": {"generateName": "gen-"}})
    assert generated.metadata.name.startswith("gen-") and len(generated.metadata.name) == 9

    svc = await core.create_namespaced_service("team-a", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    assert svc.spec.cluster_ip.startswith("10.96.") and svc.spec.ports[0].protocol == "TCP"
    svc_body = api_client.sanitize_for_serialization(svc)
    svc_body["metadata"]["labels"] = {"x": "y"}
    replaced = await core.replace_namespaced_service("web", "team-a", svc_body)
    assert replaced.metadata.labels == {"x": "y"} and replaced.spec.cluster_ip == svc.spec.cluster_ip

    await core.create_node({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.1.0/24"},
                            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.1.1"}]}})
    node = await core.patch_node_status("n1", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                                        _content_type=MERGE)
    assert node.status.conditions[0].type == "Ready" and node.status.addresses[0].address == "172.30.1.1"

    await core.delete_namespaced_pod("web", "team-a")
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod("web", "team-a")
    assert err.value.status == 404 and json.loads(err.value.body)["message"] == 'pods "web" not found'
    await core.delete_namespaced_service("web", "team-a")
    await core.delete_namespace("team-a")
    assert (await core.read_namespace("team-a")).status.phase == "Terminating"
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("team-a", pod_body("late"))
    assert err.value.status == 403

    async def contents_gone() -> None:
        with pytest.raises(ApiException) as err:
            await core.read_namespaced_pod(generated.metadata.name, "team-a")
        assert err.value.status == 404
        assert "team-a" not in {n.metadata.name for n in (await core.list_namespace()).items}
    await _eventually(contents_gone)


async def test_crud_networkpolicy_and_cilium_crds(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    net = client.NetworkingV1Api(api_client)
    np = await net.create_namespaced_network_policy("default", {"metadata": {"name": "deny"}, "spec": {
        "podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}})
    assert np.spec.policy_types == ["Ingress"] and np.spec.ingress[0].ports[0].protocol == "TCP"
    assert [p.metadata.name for p in (await net.list_network_policy_for_all_namespaces()).items] == ["deny"]
    await net.delete_namespaced_network_policy("deny", "default")

    crd = client.CustomObjectsApi(api_client)
    cnp = await crd.create_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "allow"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}}})
    assert cnp["metadata"]["generation"] == 1
    patched = await crd.patch_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", "allow",
                                                       {"spec": {"ingress": [{}]}}, _content_type=MERGE)
    assert patched["metadata"]["generation"] == 2 and patched["spec"]["ingress"] == [{}]
    status = await crd.patch_namespaced_custom_object_status(
        "cilium.io", "v2", "default", "ciliumnetworkpolicies", "allow",
        {"status": {"conditions": [{"type": "Valid", "status": "False", "message": "refused"}]}},
        _content_type=MERGE)
    assert status["status"]["conditions"][0]["message"] == "refused" and status["metadata"]["generation"] == 2
    ccnp = await crd.create_cluster_custom_object("cilium.io", "v2", "ciliumclusterwidenetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "cw"},
        "specs": [{"endpointSelector": {}}]})
    assert "namespace" not in ccnp["metadata"]
    listed = await crd.list_cluster_custom_object("cilium.io", "v2", "ciliumclusterwidenetworkpolicies")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["cw"]
    with pytest.raises(ApiException) as err:
        await crd.create_namespaced_custom_object("cilium.io", "v2", "default", "ciliumnetworkpolicies", {
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "bad"}, "spec": [1]})
    assert err.value.status == 422 and json.loads(err.value.body)["details"]["causes"][0]["field"] == "spec"
    await crd.delete_cluster_custom_object("cilium.io", "v2", "ciliumclusterwidenetworkpolicies", "cw")
    assert (await crd.list_cluster_custom_object("cilium.io", "v2", "ciliumclusterwidenetworkpolicies"))["items"] == []


async def test_label_and_field_selectors(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespace({"metadata": {"name": "other"}})
    await core.create_namespaced_pod("default", pod_body("a", {"app": "web", "tier": "front"}, node="n1"))
    await core.create_namespaced_pod("default", pod_body("b", {"app": "db"}, node="n2"))
    await core.create_namespaced_pod("other", pod_body("c", {"app": "web"}))

    async def names(**kw: Any) -> list[str]:
        return sorted(p.metadata.name for p in (await core.list_pod_for_all_namespaces(**kw)).items)

    assert await names(label_selector="app=web") == ["a", "c"]
    assert await names(label_selector="app!=web") == ["b"]
    assert await names(label_selector="app in (db, cache)") == ["b"]
    assert await names(label_selector="app notin (db)") == ["a", "c"]
    assert await names(label_selector="tier") == ["a"]
    assert await names(label_selector="!tier") == ["b", "c"]
    assert await names(field_selector="spec.nodeName=n1") == ["a"]
    assert await names(field_selector="spec.nodeName=") == ["c"]
    assert await names(field_selector="metadata.namespace=other") == ["c"]
    assert await names(field_selector="metadata.name=b,status.phase=Pending") == ["b"]
    assert [p.metadata.name for p in (await core.list_namespaced_pod("default", label_selector="app=web")).items] == ["a"]
    with pytest.raises(ApiException) as err:
        await core.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert err.value.status == 400 and "field label not supported" in json.loads(err.value.body)["message"]
    first = await core.list_pod_for_all_namespaces(limit=2)
    assert len(first.items) == 2 and first.metadata._continue
    rest = await core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert len(rest.items) == 1 and not rest.metadata._continue


async def _events(stream: Any, count: int) -> list[tuple[str, Any]]:
    out = []
    async for event in stream:
        out.append((event["type"], event["raw_object"]))
        if len(out) == count:
            break
    return out


async def test_watch_added_modified_deleted_and_resume(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    listed = await core.list_namespaced_pod("default")
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_pod, "default", resource_version=listed.metadata.resource_version,
                      timeout_seconds=10)
    reader = asyncio.create_task(_events(stream, 3))
    await asyncio.sleep(0.1)
    await core.create_namespaced_pod("default", pod_body("w1"))
    await core.patch_namespaced_pod("w1", "default", {"metadata": {"labels": {"v": "2"}}}, _content_type=MERGE)
    deleted = await core.delete_namespaced_pod("w1", "default")
    events = await asyncio.wait_for(reader, 10)
    w.stop()
    assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
    rvs = [int(o["metadata"]["resourceVersion"]) for _, o in events]
    assert rvs == sorted(rvs) and rvs[0] > int(listed.metadata.resource_version)
    assert events[2][1]["metadata"]["resourceVersion"] == deleted.metadata.resource_version

    # resume after the ADDED event: exactly the two later events
    w2 = watch.Watch()
    resumed = await asyncio.wait_for(_events(w2.stream(core.list_namespaced_pod, "default",
                                                       resource_version=str(rvs[0]), timeout_seconds=10), 2), 10)
    w2.stop()
    assert [(t, int(o["metadata"]["resourceVersion"])) for t, o in resumed] == [("MODIFIED", rvs[1]),
                                                                                 ("DELETED", rvs[2])]

    # resourceVersion unset: current state as ADDED first
    await core.create_namespaced_pod("default", pod_body("w2"))
    w3 = watch.Watch()
    initial = await asyncio.wait_for(_events(w3.stream(core.list_namespaced_pod, "default", timeout_seconds=10), 1),
                                     10)
    w3.stop()
    assert initial[0][0] == "ADDED" and initial[0][1]["metadata"]["name"] == "w2"


async def test_watch_with_selector_sends_deleted_when_object_leaves(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod("default", pod_body("s", {"app": "web"}))
    rv = (await core.list_namespaced_pod("default")).metadata.resource_version
    w = watch.Watch()
    reader = asyncio.create_task(_events(w.stream(core.list_namespaced_pod, "default", label_selector="app=web",
                                                  resource_version=rv, timeout_seconds=10), 2))
    await asyncio.sleep(0.1)
    await core.patch_namespaced_pod("s", "default", {"metadata": {"labels": {"app": "db"}}}, _content_type=MERGE)
    await core.patch_namespaced_pod("s", "default", {"metadata": {"labels": {"app": "web"}}}, _content_type=MERGE)
    events = await asyncio.wait_for(reader, 10)
    w.stop()
    assert [t for t, _ in events] == ["DELETED", "ADDED"]


async def test_bookmarks_carry_the_latest_resource_version(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_service("default", {"metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}})
    rv = (await core.list_namespaced_pod("default")).metadata.resource_version
    w = watch.Watch()
    events = await asyncio.wait_for(_events(w.stream(core.list_namespaced_pod, "default", resource_version=rv,
                                                     allow_watch_bookmarks=True, timeout_seconds=10), 1), 10)
    w.stop()
    etype, obj = events[0]
    assert etype == "BOOKMARK" and obj["kind"] == "Pod"
    assert int(obj["metadata"]["resourceVersion"]) >= int(rv)
    assert w.resource_version == obj["metadata"]["resourceVersion"]  # what a watcher resumes from


async def test_410_gone_after_compaction(api: tuple[ApiServer, client.ApiClient]) -> None:
    srv, api_client = api
    core = client.CoreV1Api(api_client)
    old_rv = (await core.list_namespaced_pod("default")).metadata.resource_version
    await core.create_namespaced_pod("default", pod_body("c1"))
    async with aiohttp.ClientSession() as session:
        async with session.post(srv.url + "/_sandbox/compact") as resp:
            assert resp.status == 200
            compacted_at = (await resp.json())["resourceVersion"]
    w = watch.Watch()
    with pytest.raises(ApiException) as err:
        await asyncio.wait_for(_events(w.stream(core.list_namespaced_pod, "default", resource_version=old_rv,
                                                timeout_seconds=5), 1), 10)
    assert err.value.status == 410 and err.value.reason.startswith("Expired: too old resource version")
    # the raw stream is what the apiserver sends: HTTP 200 and one ERROR event with a 410 Status
    async with aiohttp.ClientSession() as session:
        async with session.get(srv.url + "/api/v1/namespaces/default/pods",
                               params={"watch": "1", "resourceVersion": old_rv}) as resp:
            assert resp.status == 200
            event = json.loads(await resp.content.readline())
    assert event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    # a relist gives a resourceVersion that can be watched again
    fresh = (await core.list_namespaced_pod("default")).metadata.resource_version
    assert int(fresh) >= int(compacted_at)
    w2 = watch.Watch()
    reader = asyncio.create_task(_events(w2.stream(core.list_namespaced_pod, "default", resource_version=fresh,
                                                   timeout_seconds=10), 1))
    await asyncio.sleep(0.1)
    await core.delete_namespaced_pod("c1", "default")
    assert (await asyncio.wait_for(reader, 10))[0][0] == "DELETED"
    w2.stop()


async def test_pod_status_subresource(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod("default", {**pod_body("st"), "status": {"phase": "Running"}})
    assert (await core.read_namespaced_pod("st", "default")).status.phase == "Pending"  # create resets status
    out = await core.patch_namespaced_pod_status("st", "default", {"status": {"phase": "Running", "podIP": "10.1.1.1"},
                                                                   "spec": {"nodeName": "ignored"}},
                                                 _content_type=MERGE)
    assert out.status.pod_ip == "10.1.1.1" and out.spec.node_name is None
    main = await core.patch_namespaced_pod("st", "default", {"status": {"phase": "Failed"}}, _content_type=MERGE)
    assert main.status.phase == "Running"  # the main resource ignores status
    bound = await core.patch_namespaced_pod("st", "default", {"spec": {"nodeName": "n1"}}, _content_type=MERGE)
    assert bound.spec.node_name == "n1"
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_pod("st", "default", {"spec": {"nodeName": "n2"}}, _content_type=MERGE)
    assert err.value.status == 422 and "Forbidden: pod updates may not change" in json.loads(err.value.body)["message"]


async def _slices(api_client: client.ApiClient, service: str) -> list[dict[str, Any]]:
    body = await client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service}", _preload_content=False)
    return json.loads(await body.read())["items"]


async def _eventually(check: Any, timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await check()
        except (AssertionError, pytest.fail.Exception):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_endpointslices_follow_pod_readiness_and_named_ports(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_node({"metadata": {"name": "n1"}})
    await core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                                              {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}})

    async def placeholder() -> None:
        slices = await _slices(api_client, "web")
        assert len(slices) == 1 and slices[0]["endpoints"] == []
        assert slices[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == \
            "endpointslice-controller.k8s.io"
    await _eventually(placeholder)

    for name, port in (("a", 8080), ("b", 9090)):
        await core.create_namespaced_pod("default", pod_body(name, {"app": "web"}, [
            {"name": "http", "containerPort": port}, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}],
            node="n1"))
        await core.patch_namespaced_pod_status(name, "default", {"status": {
            "phase": "Running", "podIP": f"10.244.1.{port % 100}",
            "conditions": [{"type": "Ready", "status": "False"}]}}, _content_type=MERGE)

    async def not_ready() -> None:
        slices = await _slices(api_client, "web")
        endpoints = [e for s in slices for e in s["endpoints"]]
        assert len(endpoints) == 2 and not any(e["conditions"]["ready"] for e in endpoints)
    await _eventually(not_ready)

    await core.patch_namespaced_pod_status("a", "default", {"status": {
        "conditions": [{"type": "Ready", "status": "True"}]}}, _content_type=MERGE)

    async def ready_a() -> list[dict[str, Any]]:
        slices = await _slices(api_client, "web")
        by_http = {next(p["port"] for p in s["ports"] if p["name"] == "http"): s for s in slices}
        assert set(by_http) == {8080, 9090}  # one named port, two numbers: two slices
        ep = by_http[8080]["endpoints"][0]
        assert ep["addresses"] == ["10.244.1.80"] and ep["nodeName"] == "n1"
        assert ep["conditions"] == {"ready": True, "serving": True, "terminating": False}
        assert ep["targetRef"]["kind"] == "Pod" and ep["targetRef"]["name"] == "a"
        assert {"name": "dns", "port": 5353, "protocol": "UDP"} in by_http[8080]["ports"]
        assert by_http[9090]["endpoints"][0]["conditions"]["ready"] is False
        return slices
    await _eventually(ready_a)

    # graceful deletion of a pod bound to an existing node: terminating, not ready, still serving
    await core.delete_namespaced_pod("a", "default")

    async def terminating() -> None:
        eps = [e for s in await _slices(api_client, "web") for e in s["endpoints"] if e["targetRef"]["name"] == "a"]
        assert eps and eps[0]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    await _eventually(terminating)
    await core.delete_namespaced_pod("a", "default", grace_period_seconds=0)

    async def gone() -> None:
        slices = await _slices(api_client, "web")
        assert [e["targetRef"]["name"] for s in slices for e in s["endpoints"]] == ["b"]
    await _eventually(gone)

    await core.delete_namespaced_service("web", "default")

    async def no_slices() -> None:
        assert await _slices(api_client, "web") == []
    await _eventually(no_slices)


@pytest.mark.parametrize("body, field", [
    ({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "metadata.name"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}, "spec.containers[0].image"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "ports": [
        {"containerPort": 80}, {"containerPort": 80}]}]}}, "spec.containers[0].ports[1].containerPort"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "ports": [
        {"containerPort": 70000}]}]}}, "spec.containers[0].ports[0].containerPort"),
])
async def test_bad_pods_are_refused_naming_the_field(api: tuple[ApiServer, client.ApiClient], body: dict[str, Any],
                                                     field: str) -> None:
    _, api_client = api
    with pytest.raises(ApiException) as err:
        await client.CoreV1Api(api_client).create_namespaced_pod("default", {"apiVersion": "v1", "kind": "Pod", **body})
    status = json.loads(err.value.body)
    assert err.value.status == 422 and status["kind"] == "Status" and status["reason"] == "Invalid"
    assert status["details"]["causes"][0]["field"] == field and field in status["message"]


async def test_bad_service_is_refused_naming_the_field(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_service("default", {"metadata": {"name": "s"}, "spec": {"ports": [
            {"name": "a", "port": 80}, {"port": 81}]}})
    assert "spec.ports[1].name: Required value" in json.loads(err.value.body)["message"]
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_service("default", {"metadata": {"name": "s"}, "spec": {}})
    assert "spec.ports: Required value" in json.loads(err.value.body)["message"]
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_service("default", {"metadata": {"name": "1svc"}, "spec": {"ports": [{"port": 1}]}})
    assert "a DNS-1035 label" in json.loads(err.value.body)["message"]


async def test_dry_run_persists_nothing(api: tuple[ApiServer, client.ApiClient]) -> None:
    _, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod("default", pod_body("dry"), dry_run="All")
    assert (await core.list_namespaced_pod("default")).items == []


async def test_deletecollection_binding_and_table(api: tuple[ApiServer, client.ApiClient]) -> None:
    srv, api_client = api
    core = client.CoreV1Api(api_client)
    for name, app in (("d1", "x"), ("d2", "x"), ("d3", "y")):
        await core.create_namespaced_pod("default", pod_body(name, {"app": app}))
    await core.create_namespaced_binding("default", {"metadata": {"name": "d3"}, "target": {"kind": "Node",
                                                                                             "name": "n9"}},
                                         _preload_content=False)
    assert (await core.read_namespaced_pod("d3", "default")).spec.node_name == "n9"
    await core.delete_collection_namespaced_pod("default", label_selector="app=x")
    assert [p.metadata.name for p in (await core.list_namespaced_pod("default")).items] == ["d3"]
    async with aiohttp.ClientSession() as session:
        async with session.get(srv.url + "/api/v1/namespaces/default/pods", headers={
                "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}) as resp:
            table = await resp.json()
    assert table["kind"] == "Table" and [c["name"] for c in table["columnDefinitions"]][:3] == ["Name", "Ready",
                                                                                                 "Status"]
    assert table["rows"][0]["cells"][0] == "d3" and table["rows"][0]["object"]["metadata"]["name"] == "d3"


async def test_watch_timeout_and_send_initial_events(api: tuple[ApiServer, client.ApiClient]) -> None:
    srv, api_client = api
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod("default", pod_body("i1"))
    rv = (await core.list_namespaced_pod("default")).metadata.resource_version
    w = watch.Watch()
    seen = [e async for e in w.stream(core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1)]
    assert seen == []  # the server ended the stream after timeoutSeconds, nothing happened meanwhile
    async with aiohttp.ClientSession() as session:
        async with session.get(srv.url + "/api/v1/namespaces/default/pods", params={
                "watch": "true", "sendInitialEvents": "true", "allowWatchBookmarks": "true",
                "resourceVersionMatch": "NotOlderThan", "timeoutSeconds": "1"}) as resp:
            lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
    assert lines[0]["type"] == "ADDED" and lines[0]["object"]["metadata"]["name"] == "i1"
    assert lines[1]["type"] == "BOOKMARK"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
