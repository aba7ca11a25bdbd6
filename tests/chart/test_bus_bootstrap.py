"""`propolis bus bootstrap`: what the chart's bootstrap Job runs to create the KV buckets."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from propolis.bus import subjects
from propolis.bus.connection import Bus

PROPOLIS = str(Path(sys.executable).parent / "propolis")


async def bootstrap(url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(PROPOLIS, "--nats-url", url, "bus", "bootstrap", "--wait", "5", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_bootstrap_creates_every_bucket_idempotently(nats_server) -> None:
    for _ in range(2):  # a re-run (helm upgrade) finds them and succeeds
        code, out, err = await bootstrap(nats_server.url, "--replicas", "1")
        assert code == 0, err
        assert json.loads(out) == {"buckets": sorted(subjects.BUCKETS), "replicas": 1}
    bus = Bus(nats_server.url, name="check")
    await bus.connect(max_wait=5)
    try:
        for bucket in subjects.BUCKETS:
            info = await bus.js.stream_info(f"KV_{bucket}")  # raises when the bucket is missing
            assert info.config.num_replicas == 1
    finally:
        await bus.close()


async def test_bootstrap_with_more_replicas_than_servers_fails_naming_the_server(nats_server) -> None:
    code, _, err = await bootstrap(nats_server.url, "--replicas", "3")
    assert code != 0
    assert "bootstrap buckets at" in err and nats_server.url in err
