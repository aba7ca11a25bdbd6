"""Several allocator replicas racing on the same label sets always agree (real nats-server)."""

from __future__ import annotations

import asyncio

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import IdentityRecord
from propolis.identity.allocator import IdentityAllocator


async def test_racing_allocators_agree(nats_server, bus):
    replicas = []
    buses = []
    for i in range(3):
        b = Bus(nats_server.url, name=f"alloc-{i}")
        await b.connect(max_wait=5)
        buses.append(b)
        replicas.append(IdentityAllocator(await b.kv(subjects.IDENTITIES_BUCKET)))
    try:
        label_sets = [[f"k8s:app=app{n}", "k8s:io.kubernetes.pod.namespace=default"] for n in range(40)]
        results = await asyncio.gather(*[r.allocate(ls) for ls in label_sets for r in replicas])
        per_set = [results[i * 3:(i + 1) * 3] for i in range(len(label_sets))]
        assert all(len(set(ids)) == 1 for ids in per_set), per_set  # every replica agrees
        chosen = [ids[0] for ids in per_set]
        assert len(set(chosen)) == len(label_sets)  # distinct sets, distinct numbers
        assert all(256 <= n <= 65535 for n in chosen)
        kv = await bus.kv(subjects.IDENTITIES_BUCKET)
        stored = {e.value.id for e in (await kv.items("id.>")).values() if isinstance(e.value, IdentityRecord)}
        assert stored == set(chosen)  # losers released their claims
        assert sum(r.conflicts for r in replicas) > 0  # the race really happened
    finally:
        for b in buses:
            await b.close()


async def test_cluster_id_shifts_numbers_and_release(bus):
    alloc = IdentityAllocator(await bus.kv(subjects.IDENTITIES_BUCKET), cluster_id=3)
    n = await alloc.allocate(["k8s:app=x"])
    assert n >> 16 == 3 and 256 <= (n & 0xFFFF) <= 65535
    assert await alloc.lookup(["k8s:app=x"]) == n
    assert await alloc.release(n, ["k8s:app=x"])
    assert await alloc.lookup(["k8s:app=x"]) is None
