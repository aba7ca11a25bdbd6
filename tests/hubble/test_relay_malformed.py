"""A malformed flow on the bus (an observer's bug, a forged message) is skipped and counted by the relay:
its service-map task lives on and maps the next good flow. Real nats-server, real relay."""

from __future__ import annotations

import asyncio

import aiohttp
from hubble_helpers import flow

from propolis.bus import subjects
from propolis.bus.messages import FlowMessage
from propolis.hubble.relay import start_relay

MALFORMED = [
    {"IP": "not a dict", "verdict": "FORWARDED", "event_type": {"type": 4}},
    {"IP": {"source": "10.0.0.1", "destination": "10.0.0.2"}, "event_type": "not a dict"},
    {"IP": {"source": "10.0.0.1"}, "verdict": "FORWARDED", "event_type": {"type": 4}, "l4": {"TCP": 80}},
]


async def test_a_malformed_flow_does_not_end_the_service_map(bus):
    relay, runner, url, task = await start_relay(bus, port=0, timeout=0.3)
    try:
        await asyncio.sleep(0.6)  # past the (empty) history: the map follows the bus now
        for seq, bad in enumerate(MALFORMED, start=1):
            await bus.publish(subjects.flow_subject("n1", "FORWARDED", "_", "_"), FlowMessage("n1", "i", seq, bad))
        good = flow()
        await bus.publish(subjects.flow_subject("n1", "FORWARDED", "shop", "shop"),
                          FlowMessage("n1", "i", len(MALFORMED) + 1, good))
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                smap = await (await http.get(f"{url}/api/v1/servicemap")).json()
                if smap["edges"]:
                    break
                await asyncio.sleep(0.05)
            assert {n["id"] for n in smap["nodes"]} == {"shop/frontend", "shop/backend"}
            health = await (await http.get(f"{url}/healthz")).json()
        assert not task.done() and health["malformed_flows"] == len(MALFORMED)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
