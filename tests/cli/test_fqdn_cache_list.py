"""`propolis fqdn cache list` reads every node's record from PROPOLIS_FQDN_V1 (a real nats-server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from propolis.bus import subjects
from propolis.bus.messages import FqdnCacheRecord

ROW = {"lookup_time": 1.0, "ttl": 60, "expires_at": 61.0, "zombie": False, "alive_at": 0.0}


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "propolis.cli.main", "--nats-url", url, "fqdn", "cache", "list",
                           *args], capture_output=True, text=True, timeout=60)


async def test_every_nodes_learned_names_with_filters(bus, nats_server):
    kv = await bus.kv(subjects.FQDN_BUCKET)
    await kv.put(subjects.fqdn_key("n1"), FqdnCacheRecord("n1", 3, [
        {"name": "s3.amazonaws.com.", "ip": "203.0.113.20", **ROW},
        {"name": "api.stripe.com.", "ip": "203.0.113.30", **ROW}]))
    await kv.put(subjects.fqdn_key("n2"), FqdnCacheRecord("n2", 1, [
        {"name": "s3.amazonaws.com.", "ip": "203.0.113.21", **ROW}]))
    every = await asyncio.to_thread(_cli, nats_server.url, "-o", "json")
    assert [(r["node"], r["name"], r["ip"]) for r in json.loads(every.stdout)] == [
        ("n1", "s3.amazonaws.com.", "203.0.113.20"), ("n1", "api.stripe.com.", "203.0.113.30"),
        ("n2", "s3.amazonaws.com.", "203.0.113.21")]
    aws = await asyncio.to_thread(_cli, nats_server.url, "--node", "n1", "-n", "*.amazonaws.com")
    assert aws.returncode == 0, aws.stderr
    assert [line.split()[:2] for line in aws.stdout.splitlines()] == [["NODE", "FQDN"], ["n1", "s3.amazonaws.com."]]
    bad = await asyncio.to_thread(_cli, nats_server.url, "-n", "a b")
    assert bad.returncode != 0 and "--matchpattern" in bad.stderr
