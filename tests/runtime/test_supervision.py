"""Supervision in the service runtime, against a real nats-server: a guarded task that dies fails
/healthz, turns its component Failed for good (no later set_ok erases it), publishes a last heartbeat
saying why and ends the run with exit code 1; a one-shot task may finish; poison shows in bus health
and /metrics."""

from __future__ import annotations

import asyncio

import aiohttp

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import Heartbeat
from propolis.runtime.component import Component
from propolis.runtime.health import State
from propolis.runtime.service import Runtime
from propolis.runtime.settings import CommonSettings


class Worker(Component):
    """A component whose loop raises when told to, and which says "ok" every 10 ms (like the k8s-watcher's
    progress loop did, erasing "task died")."""

    name, title = "worker", "test component"

    def __init__(self, *, one_shot_done: bool = False) -> None:
        super().__init__()
        self.boom = asyncio.Event()
        self.one_shot_done = one_shot_done

    async def start(self, rt: Runtime) -> None:
        rt.spawn("loop", self._loop(), self)
        rt.spawn("chatty", self._chatty(), self)
        if self.one_shot_done:
            rt.spawn("take-over", asyncio.sleep(0), self, one_shot=True)

    async def _loop(self) -> None:
        await self.boom.wait()
        raise KeyError("the bucket the lease needs")

    async def _chatty(self) -> None:
        while True:
            self.set_ok()
            await asyncio.sleep(0.01)


def _runtime(nats: EmbeddedNats, component: Component) -> Runtime:
    settings = CommonSettings(nats_url=nats.url, node_name="n1", heartbeat_interval=0.2, shutdown_timeout=5)
    return Runtime("test-svc", settings, [component])


async def _wait_ready(rt: Runtime) -> None:
    for _ in range(500):
        if rt.ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("runtime never got ready")


async def test_a_dead_task_fails_healthz_and_ends_the_process_non_zero(nats_server: EmbeddedNats, bus):
    worker = Worker()
    rt = _runtime(nats_server, worker)
    run = asyncio.create_task(rt.run())
    await _wait_ready(rt)
    async with aiohttp.ClientSession() as http:
        async with http.get(rt.http_url + "/healthz") as resp:
            assert resp.status == 200
        worker.boom.set()
        await asyncio.sleep(0.05)  # the chatty loop ran meanwhile (had it not been cancelled)
        assert rt.failed.startswith("task test-svc:loop died: KeyError")
        assert worker.health.state is State.FAILED
        worker.set_ok()  # nothing turns a dead task back into OK
        assert worker.health.state is State.FAILED and rt.overall() is State.FAILED
    code = await asyncio.wait_for(run, 10)
    assert code == 1
    last = await (await bus.kv(subjects.HEARTBEATS_BUCKET)).get(
        subjects.heartbeat_key("test-svc", "n1", rt.instance))
    assert isinstance(last.value, Heartbeat) and last.value.health == "failed"
    assert "loop died: KeyError" in last.value.components["worker"]["reason"]


async def test_healthz_answers_503_once_failed(nats_server: EmbeddedNats):
    worker = Worker()
    rt = _runtime(nats_server, worker)
    rt.settings.shutdown_timeout = 5
    run = asyncio.create_task(rt.run())
    await _wait_ready(rt)
    hold = asyncio.Event()

    async def slow_stop() -> None:  # keep the process in its shutdown long enough to ask /healthz
        await hold.wait()
    worker.stop = slow_stop  # type: ignore[method-assign]
    worker.boom.set()
    await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as http:
        async with http.get(rt.http_url + "/healthz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["status"] == "failed" and "KeyError" in body["reason"]
    hold.set()
    assert await asyncio.wait_for(run, 10) == 1


async def test_one_shot_tasks_may_finish_and_a_clean_stop_exits_zero(nats_server: EmbeddedNats):
    worker = Worker(one_shot_done=True)
    rt = _runtime(nats_server, worker)
    run = asyncio.create_task(rt.run())
    await _wait_ready(rt)
    await asyncio.sleep(0.1)
    assert not rt.failed and worker.health.state is State.OK
    rt.request_stop()
    assert await asyncio.wait_for(run, 10) == 0


async def test_a_long_running_task_that_returns_is_a_failure(nats_server: EmbeddedNats):
    class Quitter(Component):
        name = "quitter"

        async def start(self, rt: Runtime) -> None:
            rt.spawn("loop", asyncio.sleep(0), self)  # not one-shot: returning means it stopped working

    rt = _runtime(nats_server, Quitter())
    assert await asyncio.wait_for(rt.run(), 10) == 1
    assert rt.failed == "task test-svc:loop exited"


async def test_poison_shows_in_bus_health_and_metrics(nats_server: EmbeddedNats, bus):
    rt = _runtime(nats_server, Worker())
    run = asyncio.create_task(rt.run())
    await _wait_ready(rt)
    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.store.put("pods.ns.p", b"\x93\xaak8s-object\x01\x00")  # ["k8s-object", 1, 0]: truncated
    watch = (await rt.bus.kv(subjects.K8S_BUCKET)).watch(">")
    assert (await asyncio.wait_for(watch.__anext__(), 5)).type is kv_mod.EventType.SYNCED
    health = rt.health()["bus"]
    assert health.state is State.DEGRADED and "PROPOLIS_K8S_V1/pods.ns.p" in health.reason
    async with aiohttp.ClientSession() as http:
        async with http.get(rt.http_url + "/metrics") as resp:
            text = await resp.text()
    assert 'propolis_bus_undecodable_values_total{bucket="PROPOLIS_K8S_V1"}' in text
    await watch.aclose()
    await kv.delete("pods.ns.p")
    kv_mod.UNDECODABLE.healed(subjects.K8S_BUCKET, "pods.ns.p")
    rt.request_stop()
    assert await asyncio.wait_for(run, 10) == 0
