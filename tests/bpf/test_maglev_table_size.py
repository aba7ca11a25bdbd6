"""maglev.tableSize (issue 20, minor): Cilium's default M = 16381 and its other primes as a
setting; the table was fixed at 251 slots (>= 100 x backends keeps the moved flows <= 1 %:
251 slots held 2 backends at that quality, 16381 hold 163)."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from test_lb import VIP, fields, service, tcp

from propolis.datapath import Datapath
from propolis.datapath.datapath import DatapathSettings
from propolis.errors import ValidationError
from propolis.lb import Backend
from propolis.maps import bpf
from propolis.maps import lb as lbmaps


def test_default_is_ciliums_and_only_its_primes_are_accepted():
    assert DatapathSettings().maglev_table_size == 16381
    with pytest.raises(ValidationError) as err:
        DatapathSettings(maglev_table_size=16383)
    assert err.value.field == "maglev.tableSize"


@pytest.mark.root
@pytest.mark.parametrize("size", [16381, 509])
def test_tables_of_the_configured_size_select_backends(size):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    dp = Datapath(f"bpfmaglev-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(lb_algorithm="maglev", maglev_table_size=size))
    pods = {"10.244.1.20": 2, "10.244.1.30": 3}
    try:
        dp.load_sync()
        for ip, ep in pods.items():
            dp.upsert_endpoint(endpoint_id=ep, ip=ip, identity=1000 + ep, ifindex=1,
                               ingress_enforced=False, egress_enforced=False)
        dp.upsert_endpoint(endpoint_id=1, ip="10.244.1.10", identity=1001, ifindex=1,
                           ingress_enforced=False, egress_enforced=False)
        dp.set_services([service(*(Backend(ip, 8080, "TCP") for ip in pods))])
        maglev = dp._map(lbmaps.MAGLEV_SPEC.pin_name)
        assert maglev.info().value_size == 4 * size
        (_, table), = list(maglev.items())
        assert len(table.backend_ids) == size and len(set(table.backend_ids)) == 2
        assert dp.programs is not None
        chosen = {fields(bpf.prog_test_run(dp.programs.from_container_fd,
                                           tcp("10.244.1.10", 44000 + i, VIP, 80))[2])[2] for i in range(40)}
        assert chosen == set(pods)
    finally:
        asyncio.run(dp.remove_all())
