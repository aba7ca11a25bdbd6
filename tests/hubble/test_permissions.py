"""With per-service NATS users (one per node for hubble): an observer publishes its own node's flows
and answers queries, the relay asks them, and neither can publish another node's flows."""

from __future__ import annotations

import asyncio

from hubble_helpers import make_event

from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import FlowQuery
from propolis.hubble.client import BusFlowSource
from propolis.hubble.observer import Observer


async def test_observer_and_relay_stay_in_their_slices(tmp_path):
    admin, users = permissions.generate_credentials(["hubble", "hubble-relay"], nodes={"hubble": ["n1"]})
    conf = permissions.server_config(users, admin=admin)
    async with EmbeddedNats(tmp_path / "nats", config_text=conf) as server:
        node = Bus(server.url, name="hubble", user="hubble@n1", password=users["hubble@n1"].password)
        relay = Bus(server.url, name="relay", user="hubble-relay", password=users["hubble-relay"].password)
        await node.connect(max_wait=5)
        await relay.connect(max_wait=5)
        try:
            obs = Observer("n1", publish=node.publish_raw)
            await obs.serve_queries(node)
            await obs.handle(make_event())
            await node.flush()
            flows, done = await BusFlowSource(relay, timeout=2, quiet=0.3).historic(FlowQuery())
            assert list(done) == ["n1"] and len(flows) == 1  # query published, answer to the inbox allowed
            errors = len(node.errors)
            await node.publish_raw(subjects.flow_subject("n2", "FORWARDED", "a", "b"), b"x")  # not its node
            await node.flush()
            for _ in range(50):
                if len(node.errors) > errors:
                    break
                await asyncio.sleep(0.05)
            assert any("permissions violation" in e.lower() and "flows.n2" in e for e in node.errors[errors:])
            errors = len(relay.errors)
            await relay.publish_raw(subjects.flow_subject("n1", "DROPPED", "a", "b"), b"x")  # relays only read flows
            await relay.flush()
            for _ in range(50):
                if len(relay.errors) > errors:
                    break
                await asyncio.sleep(0.05)
            assert any("permissions violation" in e.lower() for e in relay.errors[errors:])
        finally:
            await node.close()
            await relay.close()
