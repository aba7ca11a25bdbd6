"""A NATS outage costs the observer one log line when publishing starts failing and one when it works
again; every flow still reaches the ring, and each unpublished flow is counted (the 661 tracebacks in
2 s of issue 11 were one per flow)."""

from __future__ import annotations

import asyncio
import logging

import nats
from hubble_helpers import make_event

from propolis.bus.embedded import EmbeddedNats
from propolis.hubble.observer import Observer


async def test_an_outage_logs_once_per_state_change_and_counts_every_flow(tmp_path, caplog):
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    current = {"nc": await nats.connect(server.url)}
    got: list[str] = []
    listener = await nats.connect(server.url)

    async def on_flow(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.subject)

    await listener.subscribe("propolis.v1.flows.>", cb=on_flow)
    await listener.flush()

    async def publish(subject: str, data: bytes) -> None:
        await current["nc"].publish(subject, data)

    counted: list[int] = []
    obs = Observer("n1", publish=publish)
    obs.on_publish_failure.append(lambda: counted.append(1))
    try:
        await obs.handle(make_event())
        await current["nc"].close()  # NATS gone: every publish raises
        with caplog.at_level(logging.INFO, logger="propolis.hubble"):
            for _ in range(300):
                await obs.handle(make_event())
            current["nc"] = await nats.connect(server.url)  # back
            for _ in range(3):
                await obs.handle(make_event())
            await current["nc"].flush()
        lines = [r for r in caplog.records if r.name.startswith("propolis.hubble")]
        assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]
        assert "ConnectionClosedError" in lines[0].getMessage()
        assert "300 flows were not published" in lines[1].getMessage()
        assert obs.publish_failures == len(counted) == 300
        assert len(obs.ring) == 304  # the ring (and the sinks) saw every flow
        for _ in range(50):
            if len(got) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(got) == 4  # before the outage and after it; none of the 300 in between
    finally:
        await current["nc"].close()
        await listener.close()
        await server.stop()
