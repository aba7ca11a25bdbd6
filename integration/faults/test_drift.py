"""Drift (issue 12): kernel state changed behind the datapath-writer's back is repaired by its reconcilers'
periodic refresh, which diffs against the maps as read back, not against what the writer remembers.

Also: `sandbox up` returns only once every service reports healthy.

One policy row (the allow client -> server:8080) and one LB row (the ClusterIP frontend's master entry)
are deleted with bpftool, as an operator or a stray tool would. Both come back within one refresh
interval (`reconcile-refresh-interval`, 10 s by default), and the denied pairs stay denied throughout
(probed in a loop): repairing never opens anything.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time

import pytest
from fault_probe import NO, OK, PodDef, Prober, Workload, netpol, sel

from propolis.maps import endpoints, policy
from propolis.maps import lb as lbmaps
from propolis_sandbox import cluster, probe
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS

pytestmark = pytest.mark.root

REFRESH_INTERVAL = 10.0  # the writer's default reconcile-refresh-interval
SLACK = 3.0  # one pass over the maps, a probe's resolution, a busy machine


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=1, services="all") as state:
        yield state


async def test_status_right_after_up_finds_every_service_healthy(sandbox):
    """`sandbox up` returns once every service beats `ok` (it used to return before the writers beat)."""
    from propolis.status import collect

    bus = sandbox.admin_bus("test-status-after-up")
    await bus.connect(max_wait=5)
    try:
        rep = await collect(bus, probe_kernel=False)
    finally:
        await bus.close()
    not_ok = [f"{s.get('service')} on {s.get('node')}: {s.get('health')}" for s in rep.services if s.get("health") != "ok"]
    assert rep.services and not not_ok, not_ok
    assert {s.get("service") for s in rep.services} >= {"datapath-writer", "k8s-watcher", "identity-allocator"}


def bpftool(*args: str) -> str:
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, check=True, timeout=20).stdout


def dump(path: str) -> list[tuple[bytes, bytes]]:
    """A pinned map's raw entries, as bpftool shows them."""
    rows = json.loads(bpftool("-j", "map", "dump", "pinned", path))
    return [(bytes(int(b, 16) for b in r["key"]), bytes(int(b, 16) for b in r["value"])) for r in rows]


def delete(path: str, key: bytes) -> None:
    bpftool("map", "delete", "pinned", path, "key", "hex", *(f"{b:02x}" for b in key))


def present(path: str, key: bytes) -> bool:
    return any(k == key for k, _ in dump(path))


async def restored_within(path: str, key: bytes, what: str) -> float:
    """Seconds until `key` is back in the map; fails after one refresh interval (+ slack)."""
    started = time.monotonic()
    while not present(path, key):
        elapsed = time.monotonic() - started
        assert elapsed < REFRESH_INTERVAL + SLACK, f"{what} not restored within {elapsed:.1f}s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


SERVER_FROM_CLIENT = netpol("server-from-client", {"podSelector": sel(app="server"), "ingress": [
    {"from": [{"podSelector": sel(app="client")}], "ports": [{"port": 8080, "protocol": "TCP"}]}]})
WEB = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"},
       "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                                          "protocol": "TCP"}]}}


async def test_a_policy_row_and_an_lb_row_deleted_by_hand_come_back_within_one_refresh(sandbox):
    pin_dir = sandbox.nodes[0]["pin_dir"]
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True), PodDef("a/client", 1, {"app": "client"}),
            PodDef("a/other", 1, {"app": "other"})]
    async with Workload(sandbox, "drift", {"a": {"team": "a"}}, pods) as w:
        await w.apply([SERVER_FROM_CLIENT, WEB])
        async with cluster.Api(sandbox.apiserver_url) as api:
            cluster_ip = (await api.get(KINDS["Service"], w.ns("a"), "web"))["spec"]["clusterIP"]
        client = w.netns("a/client")

        async def via_service() -> bool:
            res, = await probe.probe_all([probe.ProbeSpec(client, cluster_ip, 80, "TCP")], timeout=0.75)
            return res.connected

        allowed = [("a/client", "a/server", 8080, "TCP", OK)]
        denied = [("a/other", "a/server", 8080, "TCP", NO), ("a/client", "a/server", 8081, "TCP", NO)]
        assert not await w.verify("before", allowed + denied)
        assert await via_service(), "the ClusterIP does not answer before the drift"

        # the allow row: server's policy map, ingress, TCP 8080
        with endpoints.SPEC.open(pin_dir) as lxc:
            server_ep = next(e for e in endpoints.dump(lxc) if e.ip == w.ip("a/server")).endpoint_id
        policy_path = f"{pin_dir}/{policy.inner_pin_name(server_ep)}"
        row = next(k for k, _ in dump(policy_path)
                   if (key := policy.PolicyKey.from_buffer_copy(k)).egress == 0 and key.protocol == 6
                   and socket.ntohs(key.dport) == 8080)
        # the LB row: the ClusterIP frontend's master entry (slot 0)
        services_path = lbmaps.SERVICES_SPEC.path(pin_dir)
        address = int.from_bytes(socket.inet_aton(cluster_ip), "little")
        master = next(k for k, _ in dump(services_path)
                      if (key := lbmaps.Lb4Key.from_buffer_copy(k)).address == address
                      and socket.ntohs(key.dport) == 80 and key.backend_slot == 0)

        async with Prober(w, denied) as prober:
            delete(policy_path, row)
            delete(services_path, master)
            assert not present(policy_path, row) and not present(services_path, master), "bpftool deleted nothing"
            policy_back, lb_back = await asyncio.gather(restored_within(policy_path, row, "the policy row"),
                                                        restored_within(services_path, master, "the LB row"))
            print(f"policy row restored after {policy_back:.2f}s, LB row after {lb_back:.2f}s "
                  f"(refresh interval {REFRESH_INTERVAL:.0f}s)")
            await asyncio.sleep(1.0)  # keep probing the denied pairs a little past the repair
        assert prober.rounds >= 4 and not prober.failures, "\n".join(prober.failures)
        assert not await w.verify("after the repair", allowed + denied)
        assert await via_service(), "the ClusterIP does not answer after the repair"
