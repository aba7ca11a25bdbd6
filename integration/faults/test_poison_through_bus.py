"""Poison bus data through the real bus (issue 11 "wedges behind a green status"): an admin connection puts
undecodable or wrongly typed values into the real buckets, over live keys, while probes run on an allowed
and a denied pair. The datapath-writer keeps enforcing (its watches live on, no restart), counts and
shows the poison, and a valid policy change made afterwards is enforced.
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import pytest
from fault_probe import NO, OK, PodDef, Prober, Workload, beat, netpol, sel

from propolis.bus import subjects
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=1, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


SERVER_FROM_CLIENT = netpol("server-from-client", {"podSelector": sel(app="server"), "ingress": [
    {"from": [{"podSelector": sel(app="client")}], "ports": [{"port": 8080, "protocol": "TCP"}]}]})


def poison(w: Workload) -> list[tuple[str, str, bytes]]:
    """(bucket, key, payload): each value issue 11 found killing a watch or a recompute, over a live key."""
    ns = w.ns("a")
    policy_key = subjects.k8s_key("networkpolicies", ns, "server-from-client")
    return [
        (subjects.K8S_BUCKET, policy_key, msgpack.packb(["k8s-object", 1, 0])),  # truncated
        (subjects.K8S_BUCKET, policy_key, msgpack.packb(  # a policy whose spec is a string
            ["k8s-object", 1, 0, "NetworkPolicy", ns, "server-from-client", "u", "1", {}, "allow everything"])),
        (subjects.K8S_BUCKET, subjects.WATERMARK_KEY, msgpack.packb(["watermark", 1, 0, "abc", 0.0])),
        (subjects.IDENTITIES_BUCKET, subjects.key("endpoints", ns, "server"), msgpack.packb(  # ips a string
            ["endpoint", 1, 0, ns, "server", sandboxed_node(w), w.ip("a/server"), 7, []])),
        (subjects.K8S_BUCKET, subjects.k8s_key("pods", ns, "ghost", node=sandboxed_node(w)), msgpack.packb(["k8s-object", 1, 0])),
    ]


def sandboxed_node(w: Workload) -> str:
    return w.state.nodes[0]["name"]


async def undecodable_total(http_url: str) -> float:
    """The writer's propolis_bus_undecodable_values_total, all buckets."""
    async with aiohttp.ClientSession() as http:
        async with http.get(http_url + "/metrics") as resp:
            text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("propolis_bus_undecodable_values_total{"))


async def bus_health(http_url: str) -> str:
    """The writer's `bus` health reason as its /status says now (the heartbeat repeats it every 2 s)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(http_url + "/status") as resp:
            return (await resp.json())["components"]["bus"]["reason"]


async def test_poison_is_a_per_key_error_and_enforcement_goes_on(sandbox):
    node = sandbox.nodes[0]["name"]
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True),
            PodDef("a/client", 1, {"app": "client"}, server=True),
            PodDef("a/other", 1, {"app": "other"}, server=True)]
    async with Workload(sandbox, "poison", {"a": {"team": "a"}}, pods) as w:
        await w.apply([SERVER_FROM_CLIENT])
        checks = [("a/client", "a/server", 8080, "TCP", OK), ("a/other", "a/server", 8080, "TCP", NO),
                  ("a/client", "a/server", 8081, "TCP", NO)]
        assert not await w.verify("before", checks)
        writer = await beat(sandbox, "datapath-writer", node)
        counted_before = await undecodable_total(writer.http)

        admin = sandbox.admin_bus("fault-test-poison")
        await admin.connect(max_wait=5)
        try:
            shown = ""
            async with Prober(w, checks) as prober:
                for bucket, key, payload in poison(w):
                    await (await admin.kv(bucket)).store.put(key, payload)
                    await asyncio.sleep(0.3)  # each one reaches the writer on its own
                    shown = shown or await bus_health(writer.http)  # before an owner repairs it
                assert "undecodable" in shown, f"the writer's health never showed the poison: {shown!r}"
                await asyncio.sleep(1.0)  # keep probing after the last poison
        finally:
            await admin.close()
        print(f"writer bus health: {shown}; {prober.rounds} probe rounds")
        assert prober.rounds >= 3 and not prober.failures, "\n".join(prober.failures)
        assert (await beat(sandbox, "datapath-writer", node)).pid == writer.pid, "the writer restarted"
        assert await undecodable_total(writer.http) - counted_before >= len(poison(w))

        # a valid change made after the poison is enforced (the watches are alive)
        failures = await w.step("deny-all on a/server after the poison",
                                [("a/client", "a/server", 8080, "TCP", NO), ("a/client", "a/other", 8080, "TCP", OK)],
                                apply=[netpol("server-deny", {"podSelector": sel(app="server"),
                                                              "policyTypes": ["Ingress"]})],
                                delete=[SERVER_FROM_CLIENT])
        assert not failures, "\n".join(failures)
        assert (await beat(sandbox, "datapath-writer", node)).pid == writer.pid
