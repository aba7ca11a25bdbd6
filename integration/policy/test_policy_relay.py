"""Policy enforced end to end with the node services behind a NATS relay (`sandbox up --nats-relays 1`).

The node services (datapath-writer, hubble, ...) connect to the relay, a leafnode holding mirrors of the
hub's buckets (`bus/relay.py`): they watch identities, policies and endpoints there and write their
ipcache entries and heartbeats through it to the hub, where the cluster services work. A policy applied
through the API must reach the kernel on both nodes that way, and `sandbox down` must stop the relay.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from policy_workload import NO, OK, PodDef, Workload, cnp, sel

from propolis.bus.connection import Bus
from propolis.bus.permissions import load_credentials
from propolis_sandbox import cluster
from propolis_sandbox.config import SandboxState
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root


def nats_url_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PROPOLIS_NATS_URL="))


async def relay_watch_consumers(state: SandboxState, url: str) -> int:
    """Consumers on the relay's mirrors: the node services' watches."""
    admin, _ = load_credentials(state.nats_credentials)
    bus = Bus(url, name="test-relay", user=admin.user, password=admin.password)
    await bus.connect(max_wait=5)
    try:
        streams = await bus.js.streams_info()
        assert all(s.config.mirror is not None for s in streams), "a relay holds mirrors only"
        return sum(s.state.consumer_count for s in streams)
    finally:
        await bus.close()


async def enforce_policy(state: SandboxState) -> None:
    w = Workload(state, "relay", {"a": {}}, [
        PodDef("a/server", 1, {"app": "server"}, server=True),
        PodDef("a/client", 2, {"app": "client"}),
        PodDef("a/intruder", 2, {"app": "intruder"}),
        PodDef("a/neighbour", 1, {"app": "neighbour"})])
    policy = cnp("server-from-client", {"endpointSelector": sel(app="server"),
                                        "ingress": [{"fromEndpoints": [sel(app="client")]}]})
    async with w:
        open_checks = [("a/client", "a/server", 8080, "TCP", OK), ("a/intruder", "a/server", 8080, "TCP", OK),
                       ("a/neighbour", "a/server", 8080, "TCP", OK)]
        assert await w.verify("no policy", open_checks) == []
        failures = await w.step("policy", [("a/client", "a/server", 8080, "TCP", OK),
                                           ("a/intruder", "a/server", 8080, "TCP", NO),
                                           ("a/neighbour", "a/server", 8080, "TCP", NO)], apply=[policy])
        assert failures == []
        assert await w.step("policy deleted", open_checks, delete=[policy]) == []


def test_policy_enforced_with_node_services_behind_a_relay() -> None:
    """One hub server: relays in front of a 3-server hub are `tests/sandbox/test_nats_relays.py`'s (with real
    servers, no sandbox: 25 s less in `make test` than a whole second sandbox here)."""
    with running_sandbox(nodes=2, services="all", nats_relays=1) as state:
        (relay,) = state.nats_relays
        relay_pid = relay["pid"]
        asyncio.run(cluster.wait(state, timeout=60))
        by_scope = {(s["scope"], s["name"], s["node"]): nats_url_of(s["pid"]) for s in state.services}
        node_urls = {url for (scope, _, _), url in by_scope.items() if scope == "node"}
        cluster_urls = {url for (scope, _, _), url in by_scope.items() if scope == "cluster"}
        assert node_urls == {relay["url"]}, by_scope
        assert cluster_urls == {state.nats_url}, by_scope
        assert asyncio.run(relay_watch_consumers(state, relay["url"])) > 0
        asyncio.run(enforce_policy(state))
    with pytest.raises(ProcessLookupError):
        os.kill(relay_pid, 0)
