"""k8s-watcher and identity-allocator against the sandbox API server and a real nats-server.

Both services run in-process through the real runtime (components, bus, tasks);
the API server is the sandbox's kube-apiserver look-alike driven with
kubernetes-asyncio-compatible HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import EndpointRecord, Event, IdentityRecord, K8sObject
from propolis.k8s import kubeclient
from propolis.k8s.kinds import KINDS
from propolis.k8s.reflector import Reflector
from propolis.runtime.service import Runtime
from propolis_sandbox.apiserver import ApiServer
from propolis_services.identity_allocator import main as allocator_main
from propolis_services.k8s_watcher import main as watcher_main


class Api:
    """Minimal JSON client for the test's writes (the watcher itself uses kubernetes-asyncio)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Content-Type": content_type}) as resp:
            doc = await resp.json()
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {doc}")
            return doc

    async def create(self, path: str, obj: dict[str, Any]) -> Any:
        """POST; a pod's status is then written through its status subresource, as a kubelet does
        (the API server resets status on create)."""
        created = await self.call("POST", path, obj)
        if path.endswith("/pods") and "status" in obj:
            name = created["metadata"]["name"]
            created = await self.call("PATCH", f"{path}/{name}/status", {"status": obj["status"]},
                                      "application/merge-patch+json")
        return created

    async def delete(self, path: str) -> Any:
        return await self.call("DELETE", path)


def pod(name: str, labels: dict[str, str], node: str = "n1", ip: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                           "spec": {"nodeName": node, "containers": [
                               {"name": "c", "image": "echo", "ports": [{"name": "http", "containerPort": 8080}]}]}}
    if ip:
        obj["status"] = {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}
    return obj


CNP_VALID = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "api-policy"},
             "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                      "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                                   "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}


async def start_service(module: Any, settings_kwargs: dict[str, Any]) -> tuple[Runtime, asyncio.Task[int]]:
    cfg = module.Settings(**settings_kwargs)
    rt = Runtime(module.SERVICE, cfg, module.build(cfg))
    task = asyncio.create_task(rt.run(), name=f"test-{module.SERVICE}")
    return rt, task


async def stop_service(rt: Runtime, task: asyncio.Task[int]) -> None:
    rt.request_stop()
    await asyncio.wait_for(task, 15)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path, nats_server, bus) -> AsyncIterator[dict[str, Any]]:
    # the watcher's refusal path needs an invalid policy to reach it: only the CRD schema checks policies here
    async with ApiServer(run_dir=tmp_path / "api", bookmark_interval=0.2, validate_policies=False) as srv:
        api = Api(srv.url)
        common = dict(nats_url=nats_server.url, node_name="n1", http_port=-1, heartbeat_interval=0.2,
                      cluster_name="test")
        try:
            yield {"srv": srv, "api": api, "bus": bus, "common": common, "kubeconfig": str(srv.kubeconfig_path)}
        finally:
            await api.close()


async def k8s_items(bus: Bus, prefix: str) -> dict[str, K8sObject]:
    kv = await bus.kv(subjects.K8S_BUCKET)
    return {k: e.value for k, e in (await kv.items(prefix)).items() if isinstance(e.value, K8sObject)}


async def test_mirror_follows_the_api_and_survives_restarts_and_410(cluster):
    api, bus = cluster["api"], cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod", "labels": {"team": "a"}}})
    await api.create("/api/v1/namespaces/prod/pods", pod("web-1", {"app": "web"}))
    await api.create("/api/v1/namespaces/prod/pods", pod("web-2", {"app": "web"}))
    await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", CNP_VALID)
    rt, task = await start_service(watcher_main, {**cluster["common"], "kubeconfig": cluster["kubeconfig"]})
    try:
        await eventually(lambda: _has(bus, "pods.n1.prod.web-2"), what="initial sync")
        objs = await k8s_items(bus, "pods.>")
        assert objs["pods.n1.prod.web-1"].labels == {"app": "web"}
        assert objs["pods.n1.prod.web-1"].fields["containers"][0]["ports"][0]["containerPort"] == 8080
        assert "ciliumnetworkpolicies.prod.api-policy" in await k8s_items(bus, "ciliumnetworkpolicies.>")
        # update and delete flow through
        await api.call("PATCH", "/api/v1/namespaces/prod/pods/web-1", {"metadata": {"labels": {"app": "web2"}}},
                       "application/merge-patch+json")
        await eventually(lambda: _label_is(bus, "pods.n1.prod.web-1", "app", "web2"), what="label update")
        await api.delete("/api/v1/namespaces/prod/pods/web-2")
        await eventually(lambda: _gone(bus, "pods.n1.prod.web-2"), what="delete")
        # progress is published
        await eventually(lambda: _async(int(rt.progress.get("k8s_resource_version", "0")) > 0), what="progress")
    finally:
        await stop_service(rt, task)

    # while the watcher is down: deletes and adds, and the API forgets its history (410 on resume)
    await api.delete("/api/v1/namespaces/prod/pods/web-1")
    await api.create("/api/v1/namespaces/prod/pods", pod("web-3", {"app": "web"}))
    await api.call("POST", "/_sandbox/compact")
    rt, task = await start_service(watcher_main, {**cluster["common"], "kubeconfig": cluster["kubeconfig"]})
    try:
        await eventually(lambda: _has(bus, "pods.n1.prod.web-3"), what="add after restart")
        await eventually(lambda: _gone(bus, "pods.n1.prod.web-1"), what="delete found by relist")
        # 410 while running: compact, then change things; the watcher relists and converges
        await api.call("POST", "/_sandbox/compact")
        await api.create("/api/v1/namespaces/prod/pods", pod("web-4", {"app": "web"}))
        await eventually(lambda: _has(bus, "pods.n1.prod.web-4"), what="add after compaction")
        assert set(await k8s_items(bus, "pods.>")) == {"pods.n1.prod.web-3", "pods.n1.prod.web-4"}
    finally:
        await stop_service(rt, task)


async def test_relist_is_paged_and_hands_the_sink_every_object(cluster):
    """The initial list comes in pages (limit/continue); the sink sees all of them, then may prune."""
    api = cluster["api"]
    for i in range(5):
        await api.create("/api/v1/namespaces/default/pods", pod(f"p{i}", {"app": "x"}))
    rv = (await api.call("GET", "/api/v1/namespaces"))["metadata"]["resourceVersion"]
    conf = kubeclient.Configuration()
    await kubeclient.load_kube_config(config_file=cluster["kubeconfig"], client_configuration=conf)
    pages: list[list[str]] = []

    class Sink:
        async def replace(self, kind: Any, page_iter: Any) -> None:
            async for page in page_iter:
                pages.append([o["metadata"]["name"] for o in page])

        def progress(self, kind: Any, resource_version: str) -> None:
            pass

    async with kubeclient.ApiClient(configuration=conf) as client:
        r = Reflector(client, KINDS["pods"], Sink(), page_size=2)
        await r._list()
    assert pages == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert r.resource_version == rv and r.synced.is_set()


async def test_invalid_policy_is_refused_and_last_good_version_stays(cluster):
    api, bus = cluster["api"], cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
    await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", CNP_VALID)
    events: list[Event] = []

    async def on_event(ev: Event, _msg: Any) -> None:
        events.append(ev)

    await bus.subscribe(subjects.events_subject("policy"), on_event, expected=Event)
    rt, task = await start_service(watcher_main, {**cluster["common"], "kubeconfig": cluster["kubeconfig"]})
    try:
        key = "ciliumnetworkpolicies.prod.api-policy"
        await eventually(lambda: _has(bus, key), what="valid policy mirrored")
        bad = {"spec": {"ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                                     "toPorts": [{"ports": [{"port": "99999", "protocol": "TCP"}]}]}]}}
        await api.call("PATCH", "/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies/api-policy", bad,
                       "application/merge-patch+json")
        await eventually(lambda: _async(bool(events)), what="refusal event")
        assert "toPorts" in events[0].fields["field"] and events[0].kind == "PolicyRefused"
        mirrored = (await k8s_items(bus, key))[key]
        assert mirrored.fields["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] == "8080"  # last good
        status = await api.call("GET", "/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies/api-policy")
        cond = status["status"]["conditions"][0]
        assert cond["type"] == "Valid" and cond["status"] == "False" and "port" in cond["message"]
    finally:
        await stop_service(rt, task)


async def test_two_watcher_replicas_one_leader_and_takeover(cluster):
    api, bus = cluster["api"], cluster["bus"]
    settings = {**cluster["common"], "kubeconfig": cluster["kubeconfig"], "lease_duration": 1.0}
    a = await start_service(watcher_main, {**settings, "node_name": "a"})
    b = await start_service(watcher_main, {**settings, "node_name": "b"})
    try:
        await eventually(lambda: _async(a[0].progress.get("leader") is not None
                                        and b[0].progress.get("leader") is not None), what="both up")
        # one of them wins the lease (neither may hold it for a moment right after start)
        await eventually(lambda: _async(sum(bool(rt.progress.get("leader")) for rt, _ in (a, b)) == 1),
                         what="exactly one leader")
        await api.create("/api/v1/namespaces", {"metadata": {"name": "x1"}})
        await eventually(lambda: _has(bus, "namespaces._.x1"), what="leader mirrors")
        leader = a if a[0].progress.get("leader") else b
        standby = b if leader is a else a
        await stop_service(*leader)
        await api.create("/api/v1/namespaces", {"metadata": {"name": "x2"}})
        await eventually(lambda: _has(bus, "namespaces._.x2"), timeout=15, what="standby takes over")
        assert standby[0].progress.get("leader") is True
    finally:
        for rt, task in (a, b):
            if not task.done():
                await stop_service(rt, task)


async def test_allocator_assigns_identities_and_follows_label_changes(cluster):
    api, bus = cluster["api"], cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod", "labels": {"env": "prod"}}})
    await api.create("/api/v1/namespaces/prod/pods", pod("fe-1", {"app": "frontend", "pod-template-hash": "abc"},
                                                         ip="10.244.1.10"))
    await api.create("/api/v1/namespaces/prod/pods", pod("fe-2", {"app": "frontend", "pod-template-hash": "def"},
                                                         ip="10.244.1.11"))
    await api.create("/api/v1/namespaces/prod/pods", pod("api-1", {"app": "api"}, ip="10.244.1.12"))
    w = await start_service(watcher_main, {**cluster["common"], "kubeconfig": cluster["kubeconfig"]})
    alloc = await start_service(allocator_main, {**cluster["common"], "identity_gc_grace": 0.5,
                                                 "identity_gc_interval": 0.1})
    ids = await bus.kv(subjects.IDENTITIES_BUCKET)

    async def endpoints() -> dict[str, EndpointRecord]:
        return {k: e.value for k, e in (await ids.items("endpoints.>")).items()}

    try:
        eps = await eventually(lambda: _count(endpoints, 3), what="three endpoints")
        fe1, fe2, api1 = eps["endpoints.prod.fe-1"], eps["endpoints.prod.fe-2"], eps["endpoints.prod.api-1"]
        assert fe1.identity == fe2.identity != api1.identity  # pod-template-hash carries no security meaning
        assert "k8s:app=frontend" in fe1.labels and "k8s:io.kubernetes.pod.namespace=prod" in fe1.labels
        assert "k8s:io.cilium.k8s.namespace.labels.env=prod" in fe1.labels
        assert fe1.ips == ["10.244.1.10"] and fe1.named_ports == {"http": ["TCP", 8080]}
        reserved = (await ids.get("id.2")).value
        assert isinstance(reserved, IdentityRecord) and reserved.reserved and reserved.labels == ["reserved:world"]
        # a label change moves the pod to another identity within one event
        old = api1.identity
        await api.call("PATCH", "/api/v1/namespaces/prod/pods/api-1", {"metadata": {"labels": {"app": "api2"}}},
                       "application/merge-patch+json")
        await eventually(lambda: _ep_identity_changed(endpoints, "endpoints.prod.api-1", old), what="relabel")
        # the old identity is unused now: collected after the grace period, never before
        assert await ids.get(f"id.{old}") is not None
        await eventually(lambda: _async_none(ids.get(f"id.{old}")), timeout=10, what="GC after grace")
        assert await ids.get(f"id.{fe1.identity}") is not None  # in use: kept
    finally:
        await stop_service(*alloc)
        await stop_service(*w)


# --- small async predicates -------------------------------------------------------------------
async def _async(value: Any) -> Any:
    return value


async def _async_none(coro: Any) -> bool:
    return (await coro) is None


async def _has(bus: Bus, key: str) -> bool:
    return key in await k8s_items(bus, key)


async def _gone(bus: Bus, key: str) -> bool:
    return key not in await k8s_items(bus, key)


async def _label_is(bus: Bus, key: str, label: str, value: str) -> bool:
    obj = (await k8s_items(bus, key)).get(key)
    return obj is not None and obj.labels.get(label) == value


async def _count(fetch: Callable[[], Any], n: int) -> Any:
    items = await fetch()
    return items if len(items) >= n else None


async def _ep_identity_changed(fetch: Callable[[], Any], key: str, old: int) -> bool:
    rec = (await fetch()).get(key)
    return rec is not None and rec.identity != old
