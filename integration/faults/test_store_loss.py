"""Fail-open scenarios 1 (the watcher's half) and 2 of issue 11: losing state is not deleting it.

In-process (real nats-server, the sandbox API server, the k8s-watcher and identity-allocator through the
real runtime, the datapath-writer's inputs):

* the k8s bucket purged while everything runs (whole stream; key by key with the watermark last): the
  writer's inputs never drop a policy, the identity-allocator deletes no endpoint record, the watcher
  refills its bucket by itself under a new epoch within seconds, later changes and deletes still flow;
* an API whose store went back (the API server replaced on the same address by one with a fresh store:
  resourceVersion back to a few, another kube-system uid), under a restarted and under a running watcher:
  the bucket is held as it was (reported in the heartbeat) until every kind was re-listed, then replaced.
  The sandbox API offers no "reset" (its store now survives restarts), so the new store is a second API
  server we start on the same port.

In a 2-node sandbox (root): the same purges while a denied pair is probed in a loop: 0 denied connections.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "watcher"))  # its API client and service helpers

from fault_probe import NO, OK, PodDef, Prober, Workload, beat, cnp, sel
from test_k8s_watcher import CNP_VALID, Api, eventually, pod, start_service, stop_service

from propolis.bus import subjects
from propolis.bus.kv import EventType
from propolis.bus.messages import K8sObject, Watermark
from propolis.writer.inputs import ClusterInputs
from propolis_sandbox import cluster
from propolis_sandbox.apiserver import ApiServer
from propolis_sandbox.fixture import running_sandbox
from propolis_services.identity_allocator import main as allocator_main
from propolis_services.k8s_watcher import main as watcher_main

POLICY_KEY = "ciliumnetworkpolicies.prod.api-policy"
STREAM = f"KV_{subjects.K8S_BUCKET}"


def named_cnp(name: str) -> dict[str, Any]:
    return {**CNP_VALID, "metadata": {"name": name}}


async def k8s_keys(bus: Any) -> dict[str, Any]:
    return {k: e.value for k, e in (await (await bus.kv(subjects.K8S_BUCKET)).items()).items()}


async def watermark(bus: Any) -> Watermark | None:
    entry = await (await bus.kv(subjects.K8S_BUCKET)).get(subjects.WATERMARK_KEY)
    return entry.value if entry is not None else None


class InputsRecorder:
    """The datapath-writer's inputs following both buckets; records what the writer could act on."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.inputs = ClusterInputs()
        self.acted_on: list[tuple[int, int]] = []  # (policies, endpoints) whenever synced
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> InputsRecorder:
        k8s, ids = await self.bus.kv(subjects.K8S_BUCKET), await self.bus.kv(subjects.IDENTITIES_BUCKET)
        self._tasks = [asyncio.create_task(self.inputs.follow(k8s, ids, node="n1")), asyncio.create_task(self._record())]
        return self

    async def _record(self) -> None:
        while True:
            await self.inputs.changed.wait()
            self.inputs.changed.clear()
            if self.inputs.synced:
                self.acted_on.append((len(self.inputs.policies), len(self.inputs.endpoints)))

    async def __aexit__(self, *exc: Any) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def api_cluster(tmp_path: Path, nats_server, bus) -> AsyncIterator[dict[str, Any]]:
    srv = ApiServer(run_dir=tmp_path / "api", bookmark_interval=0.2)
    await srv.start()
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(srv.kubeconfig_path, kubeconfig)
    api = Api(srv.url)
    common = dict(nats_url=nats_server.url, node_name="n1", http_port=-1, heartbeat_interval=0.2, cluster_name="test")
    state = {"srv": srv, "api": api, "bus": bus, "tmp": tmp_path, "kubeconfig": str(kubeconfig),
             "watcher": {**common, "kubeconfig": str(kubeconfig), "kv_repair_interval": 2.0,
                         "store_reset_settle": 1.5},
             "allocator": {**common, "kv_repair_interval": 2.0}}
    try:
        yield state
    finally:
        await api.close()
        await state["srv"].stop()


async def replace_api_store(state: dict[str, Any]) -> None:
    """The API comes back on the same address with another store (as after a restore or a loss)."""
    port = state["srv"].port
    await state["srv"].stop()
    srv = ApiServer(run_dir=state["tmp"] / "api2", port=port, bookmark_interval=0.2)
    await srv.start()
    state["srv"] = srv


async def test_purged_k8s_bucket_heals_and_nothing_is_pruned(api_cluster):
    api, bus = api_cluster["api"], api_cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
    await api.create("/api/v1/namespaces/prod/pods", pod("api-1", {"app": "api"}, ip="10.244.1.12"))
    await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", CNP_VALID)
    ids = await bus.kv(subjects.IDENTITIES_BUCKET)
    endpoint_deletes: list[str] = []

    async def watch_endpoint_deletes() -> None:
        async for ev in ids.watch("endpoints.>"):
            if ev.type is EventType.DELETE:
                endpoint_deletes.append(ev.key)

    w = await start_service(watcher_main, api_cluster["watcher"])
    a = await start_service(allocator_main, api_cluster["allocator"])
    deletes = asyncio.create_task(watch_endpoint_deletes())
    try:
        async with InputsRecorder(bus) as rec:
            await eventually(lambda: _async(rec.inputs.synced and POLICY_KEY in rec.inputs.policies
                                            and ("prod", "api-1") in rec.inputs.endpoints), what="initial sync")
            for how in ("stream purge", "keys purged, the watermark last"):
                before = await watermark(bus)
                if how == "stream purge":
                    await bus.js.purge_stream(STREAM)
                else:
                    k8s = await bus.kv(subjects.K8S_BUCKET)
                    for key in [k for k in await k8s_keys(bus) if k != subjects.WATERMARK_KEY]:
                        await k8s.store.purge(key)
                    await k8s.store.purge(subjects.WATERMARK_KEY)
                purged_at = time.monotonic()
                # the watcher refills its bucket by itself, under a new epoch
                await eventually(lambda: _refilled(bus, before),  # noqa: B023 - awaited in this iteration
                                 timeout=5, what=f"bucket refilled after {how}")
                print(f"{how}: refilled in {time.monotonic() - purged_at:.2f}s")
                await eventually(lambda: _async(rec.inputs.synced), what=f"inputs re-synced after {how}")
                assert POLICY_KEY in rec.inputs.policies and ("prod", "api-1") in rec.inputs.endpoints
            assert endpoint_deletes == [], "the identity-allocator deleted endpoint records of a purged bucket"
            assert rec.acted_on and all(p >= 1 and e >= 1 for p, e in rec.acted_on), \
                f"the writer could act on a pruned view (or never acted): {rec.acted_on}"
            await eventually(lambda: _async(int(w[0].progress.get("bucket_repairs", 0)) >= 2),
                             what="both repairs counted in the watcher's progress (updated every 50 ms)")
            # later changes and normal deletes still flow
            await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", named_cnp("later"))
            await eventually(lambda: _async("ciliumnetworkpolicies.prod.later" in rec.inputs.policies),
                             what="a later policy reaches the writer's inputs")
            await api.delete("/api/v1/namespaces/prod/pods/api-1")
            await eventually(lambda: _async(("prod", "api-1") not in rec.inputs.endpoints),
                             what="a deleted pod's endpoint record goes")
            assert endpoint_deletes == ["endpoints.prod.api-1"]
    finally:
        deletes.cancel()
        await asyncio.gather(deletes, return_exceptions=True)
        await stop_service(*a)
        await stop_service(*w)


async def test_purged_identities_bucket_is_repaired_by_its_owner(api_cluster):
    api, bus = api_cluster["api"], api_cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
    await api.create("/api/v1/namespaces/prod/pods", pod("api-1", {"app": "api"}, ip="10.244.1.12"))
    w = await start_service(watcher_main, api_cluster["watcher"])
    a = await start_service(allocator_main, api_cluster["allocator"])
    ids = await bus.kv(subjects.IDENTITIES_BUCKET)
    try:
        async with InputsRecorder(bus) as rec:
            await eventually(lambda: _async(rec.inputs.synced and ("prod", "api-1") in rec.inputs.endpoints),
                             what="initial sync")
            record = rec.inputs.endpoints[("prod", "api-1")]
            epoch = (await ids.get(subjects.WATERMARK_KEY)).value.epoch
            await bus.js.purge_stream(f"KV_{subjects.IDENTITIES_BUCKET}")
            await eventually(lambda: _ids_repaired(ids, record.identity, epoch), timeout=5, what="ids repaired")
            assert (await ids.get("endpoints.prod.api-1")).value == record
            await eventually(lambda: _async(rec.inputs.synced), what="inputs re-synced")
            assert rec.inputs.endpoints[("prod", "api-1")] == record and record.identity in rec.inputs.identities
            assert rec.acted_on and all(e >= 1 for _, e in rec.acted_on), \
                f"the writer could act without the endpoint (or never acted): {rec.acted_on}"
            assert int(a[0].progress["bucket_repairs"]) >= 1
    finally:
        await stop_service(*a)
        await stop_service(*w)


async def _ids_repaired(ids: Any, identity: int, old_epoch: str) -> bool:
    mark, ident, ep = (await ids.get(subjects.WATERMARK_KEY), await ids.get(f"id.{identity}"),
                       await ids.get("endpoints.prod.api-1"))
    return mark is not None and mark.value.epoch != old_epoch and ident is not None and ep is not None


async def test_restarted_watcher_holds_the_bucket_when_the_api_store_went_back(api_cluster):
    api, bus = api_cluster["api"], api_cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
    await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", CNP_VALID)
    for i in range(20):  # move the resourceVersion well past what a fresh store starts at
        await api.create("/api/v1/namespaces/prod/pods", pod(f"p{i}", {"app": "x"}))
    w = await start_service(watcher_main, api_cluster["watcher"])
    try:
        await eventually(lambda: _has_key(bus, POLICY_KEY), what="policy mirrored")
        await eventually(lambda: _mark_epoch_is(bus, w), what="watermark of this leader's epoch")
        old_mark = await watermark(bus)
    finally:
        await stop_service(*w)
    assert await (await bus.kv(subjects.K8S_BUCKET)).get(subjects.K8S_WATCHER_LEASE_KEY) is None, "lease not released"

    await replace_api_store(api_cluster)
    api2 = Api(api_cluster["srv"].url)
    try:
        await api2.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
        await api2.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", named_cnp("new-store"))
        started = time.monotonic()
        w = await start_service(watcher_main, api_cluster["watcher"])
        try:
            await eventually(lambda: _async(bool(w[0].progress.get("store_reset"))), what="store reset reported")
            assert time.monotonic() - started < 1.0, "the restarted watcher waited for its old lease"
            component = w[0].components[-1]
            assert component.health.state.value != "ok" and "store reset" in component.health.reason
            # held: the old contents stay, the watermark is not moved
            keys = await k8s_keys(bus)
            assert POLICY_KEY in keys and "pods.n1.prod.p19" in keys
            assert (await watermark(bus)) == old_mark
            # after the settle time and a full re-list: replaced under a new epoch
            await eventually(lambda: _async(not w[0].progress.get("store_reset")), timeout=10, what="reset done")
            await eventually(lambda: _has_key(bus, "ciliumnetworkpolicies.prod.new-store"), what="new store mirrored")
            keys = await k8s_keys(bus)
            assert POLICY_KEY not in keys and "pods.n1.prod.p19" not in keys
            mark = await watermark(bus)
            assert mark.epoch != old_mark.epoch and mark.resource_version < old_mark.resource_version
        finally:
            await stop_service(*w)
    finally:
        await api2.close()


async def test_running_watcher_holds_the_bucket_when_the_api_store_goes_back(api_cluster):
    api, bus = api_cluster["api"], api_cluster["bus"]
    await api.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
    await api.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", CNP_VALID)
    for i in range(20):
        await api.create("/api/v1/namespaces/prod/pods", pod(f"p{i}", {"app": "x"}))
    w = await start_service(watcher_main, api_cluster["watcher"])
    a = await start_service(allocator_main, api_cluster["allocator"])  # the identities bucket's watermark
    api2 = None
    try:
        async with InputsRecorder(bus) as rec:
            await eventually(lambda: _async(rec.inputs.synced and POLICY_KEY in rec.inputs.policies),
                             what="initial sync")
            old_epoch = w[0].progress["bucket_epoch"]
            await replace_api_store(api_cluster)
            api2 = Api(api_cluster["srv"].url)
            await api2.create("/api/v1/namespaces", {"metadata": {"name": "prod"}})
            await eventually(lambda: _async(bool(w[0].progress.get("store_reset"))), what="store reset detected")
            assert POLICY_KEY in await k8s_keys(bus) and POLICY_KEY in rec.inputs.policies
            await eventually(lambda: _async(not w[0].progress.get("store_reset")), timeout=10, what="reset done")
            await eventually(lambda: _async(POLICY_KEY not in rec.inputs.policies), what="replaced")
            assert w[0].progress["bucket_epoch"] != old_epoch and int(w[0].progress["store_resets"]) == 1
            # the policy was there, uninterrupted, until the full re-list replaced the bucket
            first_without = next(i for i, (p, _) in enumerate(rec.acted_on) if p == 0)
            assert first_without > 0 and all(p == 1 for p, _ in rec.acted_on[:first_without]), rec.acted_on
            # and it follows the new store from then on
            await api2.create("/apis/cilium.io/v2/namespaces/prod/ciliumnetworkpolicies", named_cnp("after"))
            await eventually(lambda: _async("ciliumnetworkpolicies.prod.after" in rec.inputs.policies),
                             what="a change on the new store")
    finally:
        await stop_service(*a)
        await stop_service(*w)
        if api2 is not None:
            await api2.close()


async def _async(value: Any) -> Any:
    return value


async def _has_key(bus: Any, key: str) -> bool:
    return key in await k8s_keys(bus)


async def _mark_epoch_is(bus: Any, w: Any) -> bool:
    mark = await watermark(bus)
    return mark is not None and mark.epoch == w[0].progress.get("bucket_epoch")


async def _refilled(bus: Any, before: Watermark | None) -> bool:
    keys = await k8s_keys(bus)
    mark = keys.get(subjects.WATERMARK_KEY)
    return (POLICY_KEY in keys and isinstance(keys.get("pods.n1.prod.api-1"), K8sObject)
            and isinstance(mark, Watermark) and before is not None and mark.epoch != before.epoch)


# --- in a 2-node sandbox, with packets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


async def purge_k8s_bucket(state: Any, how: str, between: Any) -> Watermark | None:
    """Purge PROPOLIS_K8S_V1 as an operator with admin rights would, awaiting `between()` in the middle
    (the whole stream, then `between`; or every key, `between`, the watermark last); returns the
    watermark it had."""
    bus = state.admin_bus("fault-test-purge")
    await bus.connect(max_wait=5)
    try:
        kv = await bus.kv(subjects.K8S_BUCKET)
        before = await kv.get(subjects.WATERMARK_KEY)
        if how == "stream purge":
            await bus.js.purge_stream(STREAM)
            await between()
        else:
            for key in [k for k in await kv.items() if k != subjects.WATERMARK_KEY]:
                await kv.store.purge(key)
            await between()
            await kv.store.purge(subjects.WATERMARK_KEY)
        return before.value if before is not None else None
    finally:
        await bus.close()


async def wait_refilled(state: Any, before: Watermark | None, policy_key: str, timeout: float = 10.0) -> float:
    """Until the bucket holds `policy_key` again under a watermark of a new epoch; returns the seconds."""
    bus = state.admin_bus("fault-test-refill")
    await bus.connect(max_wait=5)
    started = time.monotonic()
    try:
        kv = await bus.kv(subjects.K8S_BUCKET)
        while True:
            mark = await kv.get(subjects.WATERMARK_KEY)
            if mark is not None and await kv.get(policy_key) is not None and \
                    (before is None or mark.value.epoch != before.epoch):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"PROPOLIS_K8S_V1 not refilled within {timeout:.0f}s"
            await asyncio.sleep(0.05)
    finally:
        await bus.close()


async def watcher_reports_bucket_epoch(state: Any, timeout: float = 15.0) -> Any:
    """Until the k8s-watcher's heartbeat is ok and names the epoch of its bucket's watermark."""
    bus = state.admin_bus("fault-test-epoch")
    await bus.connect(max_wait=5)
    deadline = time.monotonic() + timeout
    try:
        kv = await bus.kv(subjects.K8S_BUCKET)
        while True:
            mark, hb = await kv.get(subjects.WATERMARK_KEY), await beat(state, "k8s-watcher")
            if mark is not None and hb is not None and hb.health == "ok" and \
                    hb.progress.get("bucket_epoch") == mark.value.epoch:
                return hb
            assert time.monotonic() < deadline, f"k8s-watcher heartbeat {hb and hb.progress} vs watermark {mark}"
            await asyncio.sleep(0.2)
    finally:
        await bus.close()


@pytest.mark.root
async def test_sandbox_bucket_purges_let_no_denied_connection_through(sandbox):
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True),
            PodDef("a/client", 2, {"app": "client"}, server=True),
            PodDef("a/other", 1, {"app": "other"}, server=True),
            PodDef("a/other2", 2, {"app": "other"}, server=True)]
    policy = [cnp("server", {"endpointSelector": sel(app="server"),
                             "ingress": [{"fromEndpoints": [sel(app="client")],
                                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]})]
    denied = [(src, "a/server", 8080, "TCP", NO) for src in ("a/other", "a/other2")]
    allowed = [("a/client", "a/server", 8080, "TCP", OK)]
    async with Workload(sandbox, "purge", {"a": {"team": "a"}}, pods) as w:
        failures = await w.step("before", allowed + denied, apply=policy)
        assert not failures, "\n" + "\n".join(failures)
        policy_key = f"ciliumnetworkpolicies.{w.ns('a')}.server"
        async with Prober(w, allowed + denied, loops=3) as prober:
            await asyncio.sleep(0.5)
            for i, how in enumerate(("stream purge", "keys purged, the watermark last")):
                # an unrelated API change in the middle: it used to write a fresh watermark over the empty
                # bucket (and, with the watermark purged last, one the purge had not reached yet)
                unrelated = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"unrelated-{i}"},
                             "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 80}]}}

                async def unrelated_change() -> None:
                    await cluster.apply_documents(sandbox, w.documents([unrelated], "unrelated"))  # noqa: B023 - awaited here
                    await asyncio.sleep(0.5)

                before = await purge_k8s_bucket(sandbox, how, unrelated_change)
                seconds = await wait_refilled(sandbox, before, policy_key)
                print(f"{how}: PROPOLIS_K8S_V1 refilled by the k8s-watcher in {seconds:.2f}s")
                await asyncio.sleep(1.0)  # the writers re-sync under the new epoch: keep probing through it
        print(f"probe rounds: {prober.rounds}")
        assert prober.rounds > 5, prober.rounds
        assert not prober.failures, "\n" + "\n".join(prober.failures[:20])
        # the watcher is healthy again and reports the epoch its bucket's watermark carries
        reported = await watcher_reports_bucket_epoch(sandbox)
        print(f"k8s-watcher progress: {reported.progress}")
        # a later policy change is still enforced: the client is denied too
        deny_client = [cnp("deny-client", {"endpointSelector": sel(app="server"),
                                           "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]})]
        failures = await w.step("policy change after the purges",
                                [("a/client", "a/server", 8080, "TCP", NO)] + denied, apply=deny_client)
        assert not failures, "\n" + "\n".join(failures)
