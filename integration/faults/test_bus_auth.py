"""Fail-open scenario 3 of issue 11: anyone on the machine could write the bus. A forged
`endpoints.<ns>.<pod>` record carrying an allowed client's identity and an intruder's IP let a
denied pod through (426 denied connections, never healed).

The sandbox's nats-server now runs with production's users (`bus/permissions.py`): one per service,
one per node for node-scoped services, credentials in a root-only file of the run directory; the
supervisor and the CLI are admin. Here, in a sandbox running the whole suite:

* every service works within its permissions (the sandbox converges, no service logs a violation);
* a process without credentials (or with a wrong password) cannot connect;
* every user but the identity-allocator's is refused by the server when it writes an endpoint record,
  and the denied pair stays denied throughout (probed in a loop); the allocator's user can write;
* a service cannot delete another service's consumers, yet its own KV watches and snapshots work.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import nats
import pytest
from fault_probe import NO, OK, PodDef, Prober, Workload, netpol, sel

from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis.bus.messages import EndpointRecord
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root

ALLOCATOR = "identity-allocator"


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=90))
        yield state


def users(state) -> dict[str, permissions.Credentials]:
    return permissions.load_credentials(state.nats_credentials)[1]


async def connected(state, user: str) -> Bus:
    cred = users(state)[user]
    bus = Bus(state.nats_url, name=f"bus-auth-test-{user}", user=cred.user, password=cred.password)
    await bus.connect(max_wait=5)
    return bus


async def refused(bus: Bus, attempt, what: str, timeout: float = 3.0) -> str:
    """Run `attempt` (a coroutine function); the server must refuse it: returns the violation it reported."""
    before = len(bus.errors)
    try:
        await asyncio.wait_for(attempt(), timeout)
    except (TimeoutError, nats.errors.Error):
        pass
    else:
        raise AssertionError(f"{bus.name}: {what} was accepted")
    for _ in range(40):
        violations = [e for e in bus.errors[before:] if "permissions violation" in e.lower()]
        if violations:
            return violations[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{bus.name}: {what} failed without a permissions violation: {bus.errors[before:]}")


def test_credentials_are_root_only_and_required(sandbox):
    state = sandbox
    for path in (Path(state.nats_credentials), state.sandbox().nats_dir / "nats-server.conf"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    admin, _ = permissions.load_credentials(state.nats_credentials)
    assert admin.password not in state.sandbox().state_path.read_text()  # state.json only names the file

    async def attempt(**auth: str) -> str:
        try:
            nc = await nats.connect(state.nats_url, allow_reconnect=False, connect_timeout=2, **auth)
        except Exception as exc:  # noqa: BLE001 - what the server answered is the point
            return f"{type(exc).__name__}: {exc}"
        await nc.close()
        return "connected"

    async def main() -> None:
        for auth in ({}, {"user": "admin", "password": "guessed"},
                     {"user": f"hubble@{state.nodes[0]['name']}", "password": admin.password}):
            outcome = await attempt(**auth)
            assert outcome != "connected" and "authorization" in outcome.lower(), (auth.get("user"), outcome)
        assert await attempt(user=admin.user, password=admin.password) == "connected"

    asyncio.run(main())


async def test_only_the_identity_allocator_writes_endpoint_records(sandbox):
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True), PodDef("a/client", 2, {"app": "client"}),
            PodDef("a/intruder", 2, {"app": "intruder"})]
    checks = [("a/client", "a/server", 8080, "TCP", OK), ("a/intruder", "a/server", 8080, "TCP", NO)]
    async with Workload(sandbox, "busauth", {"a": {}}, pods) as w:
        await w.apply([netpol("server-from-client", {"podSelector": sel(app="server"), "ingress": [
            {"from": [{"podSelector": sel(app="client")}], "ports": [{"port": 8080, "protocol": "TCP"}]}]})])
        assert await w.verify("before", checks) == []
        admin = sandbox.admin_bus("bus-auth-test-admin")
        await admin.connect(max_wait=5)
        ids = await admin.kv(subjects.IDENTITIES_BUCKET)
        client = (await ids.get(f"endpoints.{w.ns('a')}.client")).value
        intruder_key = f"endpoints.{w.ns('a')}.intruder"
        intruder = await ids.get(intruder_key)
        forged_key = f"endpoints.{w.ns('a')}.forged"
        forged = EndpointRecord(namespace=w.ns("a"), name="forged", node=client.node, ips=[w.ip("a/intruder")],
                                identity=client.identity, labels=list(client.labels))
        others = sorted(u for u in users(sandbox) if u != ALLOCATOR)
        buses = [await connected(sandbox, u) for u in others]
        try:
            async with Prober(w, checks) as prober:
                async def forge(bus: Bus) -> str:
                    kv = await bus.kv(subjects.IDENTITIES_BUCKET)
                    return await refused(bus, lambda: kv.put(forged_key, forged), f"put {forged_key}")

                violations = await asyncio.gather(*(forge(b) for b in buses))
                assert violations and all("endpoints" in v for v in violations), violations
                assert await ids.get(forged_key) is None
                # the owner's own user writes its slice (re-putting the intruder's true record changes nothing)
                allocator = await connected(sandbox, ALLOCATOR)
                try:
                    revision = await (await allocator.kv(subjects.IDENTITIES_BUCKET)).put(intruder_key,
                                                                                          intruder.value)
                    assert revision > intruder.revision
                finally:
                    await allocator.close()
                await asyncio.sleep(2.0)  # long enough for a forged record to have reached both writers
            assert prober.rounds >= 3 and prober.failures == [], prober.failures
            print(f"{len(others)} users refused ({', '.join(others)}); {prober.rounds} probe rounds, 0 denied")
        finally:
            for bus in buses:
                await bus.close()
            await admin.close()


async def test_a_service_cannot_delete_another_services_consumers(sandbox):
    admin = sandbox.admin_bus("bus-auth-test-admin")
    await admin.connect(max_wait=5)
    hubble = await connected(sandbox, f"hubble@{sandbox.nodes[0]['name']}")
    stream = f"KV_{subjects.K8S_BUCKET}"
    try:
        theirs = [c.name for c in await admin.js._jsm.consumers_info(stream)]
        assert theirs, "the writers and the allocator watch the k8s bucket: their consumers must exist"
        victim = theirs[0]
        violation = await refused(hubble, lambda: hubble.js._jsm.delete_consumer(stream, victim),
                                  f"delete consumer {victim}")
        assert "consumer.delete" in violation.lower()
        assert (await admin.js._jsm.consumer_info(stream, victim)).name == victim  # still there
        # its own watch (a consumer it creates) and a snapshot (direct gets, no consumer) still work
        kv = await hubble.kv(subjects.K8S_BUCKET)
        events = kv.watch(follow=False)
        seen = [ev.type async for ev in events]
        assert seen[-1] is EventType.SYNCED and seen.count(EventType.PUT) >= 2  # at least the two Nodes
        snapshot = await kv.items("nodes.>")
        assert len(snapshot) == len(sandbox.nodes)
    finally:
        await hubble.close()
        await admin.close()


def test_every_service_runs_within_its_permissions(sandbox):
    """Last in this module, after the workload ran: the sandbox converged for every change (each service did
    its work: mirrored, allocated, wrote its node's ipcache rows and maps, published flows), and no service
    was refused anything."""
    state = sandbox
    running = {permissions.user_name(s["name"], s["node"] if s["scope"] == "node" else None) for s in state.services}
    assert running == set(users(state))  # one user per service, per node for node-scoped ones
    for log in Path(state.sandbox().log_dir).glob("*.log"):
        text = log.read_text(errors="replace").lower()
        assert "permissions violation" not in text and "authorization violation" not in text, log
