"""The sandbox's nats-server takes more consumers on one stream than nats-server 2.15's default cap of 1,000
(`nats_cluster.MAX_CONSUMERS_PER_STREAM`): each node runs up to five watchers of the k8s bucket, so with the
default a 201st node's services would wait for a consumer forever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from propolis_sandbox.nats_cluster import MAX_CONSUMERS_PER_STREAM, NatsServers

PAST_THE_DEFAULT = 1100


async def test_a_stream_takes_more_than_a_thousand_consumers(tmp_path: Path) -> None:
    assert MAX_CONSUMERS_PER_STREAM >= 5 * 5000  # five watchers per node, 5,000 nodes connected directly
    servers = NatsServers(tmp_path / "nats", replicas=1, config_text="", cluster_name="t", log_dir=tmp_path)
    url = await servers.start()
    try:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="KV_T", subjects=["$KV.T.>"])
            for start in range(0, PAST_THE_DEFAULT, 100):
                await asyncio.gather(*(js.add_consumer("KV_T", ConsumerConfig(name=f"node{i}", mem_storage=True,
                                                                              ack_policy=AckPolicy.NONE))
                                       for i in range(start, min(start + 100, PAST_THE_DEFAULT))))
            assert (await js.stream_info("KV_T")).state.consumer_count == PAST_THE_DEFAULT
        finally:
            await nc.close()
    finally:
        await servers.stop()
