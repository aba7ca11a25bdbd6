"""The datapath-writer's LB target on real maps: a change writes only its frontends; a purge or a failed
write is repaired by a full write (the periodic refresh recomputes the table from the inputs first)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from propolis.datapath import Datapath
from propolis.errors import PermanentError
from propolis.lb import Backend, LBService
from propolis.lb.frontends import FrontendTable, service_owner
from propolis.maps import lb as lbmaps
from propolis.writer.targets import ServicesTarget

pytestmark = pytest.mark.root
WRITTEN = (lbmaps.SERVICES_SPEC, lbmaps.BACKENDS_SPEC, lbmaps.REV_NAT_SPEC, lbmaps.MAGLEV_SPEC, lbmaps.AFFINITY_SPEC)


def svc(i: int, backend: str = "10.244.1.10") -> LBService:
    return LBService("ns", f"s{i}", "http", "ClusterIP", f"10.96.0.{i}", 80, "TCP", (Backend(backend, 8080),))


@pytest.fixture
def dp(harness) -> Iterator[Datapath]:  # type: ignore[no-untyped-def]
    def clear() -> None:
        for spec in WRITTEN:
            harness.dp._map(spec.pin_name).clear()
        harness.dp._services = None
    clear()
    try:
        yield harness.dp
    finally:
        clear()


def frontends(dp: Datapath) -> dict[str, list[str]]:
    return {v.frontend: [b.address for b in v.backends] for v in dp.list_services()}


def test_changes_write_only_their_frontends_and_a_refresh_repairs_a_purge(dp: Datapath) -> None:
    table = FrontendTable()
    target = ServicesTarget(dp, table)
    recomputed = []
    target.recompute = lambda: recomputed.append(True)
    table.replace_all({service_owner("ns", f"s{i}"): [svc(i)] for i in range(1, 101)})
    asyncio.run(target.update("n1", 1))
    assert target.last is not None and target.last.frontends_added == 100 and len(frontends(dp)) == 100

    table.assign(service_owner("ns", "s7"), [svc(7, "10.244.1.77")])
    table.assign(service_owner("ns", "s8"), [])
    asyncio.run(target.update("n1", 2))
    assert (target.last.frontends_added, target.last.frontends_removed) == (0, 1)
    assert target.last.entries_written <= 4  # s7's master, slot and new backend; nothing of the other 98
    actual = frontends(dp)
    assert actual["10.96.0.7:80"] == ["10.244.1.77:8080"] and "10.96.0.8:80" not in actual and len(actual) == 99

    for spec in WRITTEN:  # purged behind the writer's back
        dp._map(spec.pin_name).clear()
    asyncio.run(target.refresh("n1", 2))
    assert recomputed and len(frontends(dp)) == 99 and frontends(dp)["10.96.0.7:80"] == ["10.244.1.77:8080"]


def test_a_failed_incremental_write_makes_the_next_one_full(dp: Datapath) -> None:
    table = FrontendTable()
    target = ServicesTarget(dp, table)
    table.assign(service_owner("ns", "s1"), [svc(1)])
    asyncio.run(target.update("n1", 1))
    table.assign(service_owner("ns", "s2"), [svc(2)])
    dp._services = None  # the writer's cache lost: update_services refuses (no full write in this process)
    with pytest.raises(PermanentError, match="before update_services"):
        asyncio.run(target.update("n1", 2))
    table.assign(service_owner("ns", "s3"), [svc(3)])
    asyncio.run(target.update("n1", 3))
    assert sorted(frontends(dp)) == ["10.96.0.1:80", "10.96.0.2:80", "10.96.0.3:80"]
