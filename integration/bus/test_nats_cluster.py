"""A sandbox on a 3-server JetStream cluster (`sandbox up --nats-replicas 3`) loses one server under load.

While policies are applied through the API server, the supervisor's watch follows the mirror and a
writer puts straight into a replicated bucket, the leader of the mirror's stream is SIGKILLed. Then:
nothing is lost (every policy the API server accepted is in the KV mirror, every put JetStream acked
is in its bucket), the watch goes on (it sees the policies applied after the kill), the suite catches
up (`sandbox wait`), a policy applied after the kill is enforced, and the supervisor restarts the
killed server on its port and store and it rejoins (current again on every replicated stream).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js import api as js_api

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis_sandbox import cluster
from propolis_sandbox.config import SandboxConfig, SandboxState
from propolis_sandbox.fixture import running_sandbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy"))  # one workload helper, not two

from policy_workload import NO, OK, PodDef, Workload, cnp, sel

pytestmark = pytest.mark.root

REPLICAS = 3
LOAD_BEFORE_KILL_S = 1.5
LOAD_AFTER_KILL_S = 8.0  # past a request in flight on the killed server (lost with its connection: 5 s timeout)
TEST_BUCKET = "PROPOLIS_TEST_NATS_CLUSTER"


@pytest.fixture(scope="module")
def sandbox() -> Any:
    with running_sandbox(nodes=1, services="all", nats_replicas=REPLICAS) as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def fresh_state(state: SandboxState) -> SandboxState:
    return SandboxState.load(SandboxConfig(name=state.sandbox().name).state_path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def stream_current(bus: Bus, stream: str) -> bool:
    """Every peer of the stream's Raft group current (caught up with the leader), with a leader."""
    info = await bus.js.stream_info(stream)
    group = info.cluster
    return (group is not None and bool(group.leader) and len(group.replicas or []) == REPLICAS - 1
            and all(peer.current and not peer.offline for peer in group.replicas or []))


async def kill_leader(bus: Bus, state: SandboxState, stream: str) -> tuple[int, dict[str, Any]]:
    """SIGKILL the server leading ``stream``; returns its index and its state.json record."""
    leader = (await bus.js.stream_info(stream)).cluster.leader
    index = int(leader.rsplit("-", 1)[1]) - 1  # servers are named <cluster>-<n>
    victim = fresh_state(state).nats_servers[index]
    os.kill(victim["pid"], signal.SIGKILL)
    return index, victim


async def rejoined(bus: Bus, state: SandboxState, index: int, victim: dict[str, Any],
                   buckets: list[str]) -> None:
    """The supervisor restarted the killed server on its port and it is current again on every bucket."""
    async def restarted() -> bool:
        now = fresh_state(state).nats_servers[index]
        return now["url"] == victim["url"] and now["pid"] != victim["pid"] and alive(now["pid"])
    await until("the supervisor restarting the killed server on its port", restarted, timeout=30)
    for bucket in buckets:
        await until(f"KV_{bucket} current on every server again",
                    lambda b=bucket: stream_current(bus, f"KV_{b}"), timeout=60)


async def until(what: str, predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await predicate():
                return
        except Exception as exc:  # noqa: BLE001 - the cluster settles: ask again
            last = exc
        else:
            last = None
        assert time.monotonic() < deadline, f"{what} not within {timeout}s (last error: {last})"
        await asyncio.sleep(0.25)


def policy(n: int) -> dict[str, Any]:
    """An allow policy for a label no pod has: compiled by every datapath-writer, changes no packet."""
    return cnp(f"load-{n}", {"endpointSelector": sel(app=f"nobody-{n}"),
                             "ingress": [{"fromEndpoints": [sel(app="client")]}]})


async def test_a_server_killed_under_load_loses_nothing_and_rejoins(sandbox: SandboxState) -> None:
    assert len(sandbox.nats_servers) == REPLICAS and sandbox.nats_url.count(",") == REPLICAS - 1
    bus = sandbox.admin_bus("test-nats-cluster")
    await bus.connect(max_wait=10)
    watcher: asyncio.Task[None] | None = None
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True), PodDef("a/client", 1, {"app": "client"})]
    try:
        for bucket in subjects.BUCKETS:
            assert (await bus.js.stream_info(f"KV_{bucket}")).config.num_replicas == REPLICAS, bucket
        raw = await bus.js.create_key_value(js_api.KeyValueConfig(bucket=TEST_BUCKET, replicas=REPLICAS))
        async with Workload(sandbox, "natsha", {"a": {}}, pods) as w:
            assert not await w.verify("before", [("a/client", "a/server", 8080, "TCP", OK)])
            namespace = w.ns("a")
            k8s = await bus.kv(subjects.K8S_BUCKET)
            watched: dict[str, float] = {}  # mirrored policy name -> when the watch delivered it

            async def watch() -> None:
                async for event in k8s.watch(subjects.k8s_keys("ciliumnetworkpolicies", namespace)):
                    parsed = subjects.parse_k8s_key(event.key) if event.type == EventType.PUT else None
                    if parsed is not None:
                        watched[parsed.name] = time.monotonic()

            applied: dict[str, float] = {}  # policy name -> when the API server accepted it
            acked: dict[str, tuple[bytes, float]] = {}  # key -> (value, when) JetStream acknowledged

            async def apply_policies(stop: asyncio.Event) -> None:
                n = 0
                while not stop.is_set():
                    doc = w.documents([policy(n)], "load")
                    try:
                        await cluster.apply_documents(sandbox, doc, dry_run_first=False)
                        applied[f"load-{n}"] = time.monotonic()
                    except Exception as exc:  # noqa: BLE001 - not accepted: not expected in the mirror
                        print(f"apply load-{n}: {exc}")
                    n += 1
                    await asyncio.sleep(0.05)

            async def put_directly(stop: asyncio.Event) -> None:
                n = 0
                while not stop.is_set():
                    key, value = f"k{n}", str(n).encode()
                    try:
                        await raw.put(key, value)
                        acked[key] = value, time.monotonic()
                    except Exception as exc:  # noqa: BLE001 - no ack (leader election): not counted
                        print(f"put {key}: {exc}")
                    n += 1
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            stop = asyncio.Event()
            load = [asyncio.create_task(apply_policies(stop)), asyncio.create_task(put_directly(stop))]
            await asyncio.sleep(LOAD_BEFORE_KILL_S)
            index, victim = await kill_leader(bus, sandbox, f"KV_{subjects.K8S_BUCKET}")
            killed_at = time.monotonic()
            await asyncio.sleep(LOAD_AFTER_KILL_S)
            stop.set()
            await asyncio.gather(*load)
            after_kill = [name for name, at in applied.items() if at > killed_at]
            acked_after_kill = [key for key, (_, at) in acked.items() if at > killed_at]
            assert after_kill and acked_after_kill, f"no load after the kill: {after_kill}, {acked_after_kill}"

            await cluster.wait(sandbox, timeout=60)  # every service caught up with the API server
            mirrored = {p.name for key in await k8s.items(subjects.k8s_keys("ciliumnetworkpolicies", namespace))
                        if (p := subjects.parse_k8s_key(key)) is not None}
            assert set(applied) <= mirrored, f"accepted but not mirrored: {sorted(set(applied) - mirrored)}"
            async def watched_all() -> bool:
                return set(after_kill) <= set(watched)
            await until("the watch delivering every policy applied after the kill", watched_all, timeout=30)
            assert not watcher.done(), "the watch ended"
            for key, (value, _) in acked.items():
                entry = await raw.get(key)
                assert entry.value == value, f"acked put {key}={value!r} reads {entry.value!r}"

            deny = cnp("deny-client", {"endpointSelector": sel(app="server"),
                                       "ingress": [{"fromEndpoints": [sel(app="nobody")]}]})
            assert not await w.step("after the kill", [("a/client", "a/server", 8080, "TCP", NO)], apply=[deny])

        await rejoined(bus, sandbox, index, victim, [*subjects.BUCKETS, TEST_BUCKET])
    finally:
        if watcher is not None:
            watcher.cancel()
        try:
            await bus.js.delete_key_value(TEST_BUCKET)
        finally:
            await bus.close()


async def test_sandbox_wait_rides_out_the_heartbeat_stream_electing_a_leader(sandbox: SandboxState) -> None:
    """`sandbox wait` right after the heartbeat stream's leader died: its reads time out until the two
    servers left elect another (Raft, several seconds), and it must read again until its own deadline.
    It used to end at the first unanswered read, 5 s after the kill ("within 60s: no heartbeats read
    (nats: timeout)"), which made the test above flaky when the election outlasted its load phase."""
    bus = sandbox.admin_bus("test-nats-cluster-wait")
    await bus.connect(max_wait=10)
    try:
        index, victim = await kill_leader(bus, sandbox, f"KV_{subjects.HEARTBEATS_BUCKET}")
        await cluster.wait(sandbox, timeout=60)
        await rejoined(bus, sandbox, index, victim, list(subjects.BUCKETS))
    finally:
        await bus.close()
