"""A recompile on a node that has pins adopts its maps (nothing flushed) and the new programs use them."""

from __future__ import annotations

import pytest

from propolis.datapath import PolicyEntry
from propolis.datapath import packets as pk
from propolis.datapath.loader import _pinned_map_ids, compile_programs
from propolis.maps import bpf

pytestmark = pytest.mark.root


def test_recompile_adopts_pinned_maps(harness):
    h = harness
    h.endpoint(7, "10.244.9.7", 777, ingress=True)
    h.dp.set_policy(7, [PolicyEntry("ingress", identity=2, protocol=6, port=80)])
    fresh = compile_programs(h.dp.node, h.dp.pin_dir, reuse_pinned=False)  # e.g. after an upgrade
    try:
        assert fresh.compiled and set(fresh.adopted_pins) >= {"cilium_lxc", "cilium_ep_to_policy", "cilium_ct4_global"}
        uses = {i for fd in (fresh.from_container_fd, *fresh.sock_fds.values()) for i in bpf.prog_map_ids(fd)}
        assert _pinned_map_ids(h.dp.pin_dir) <= uses
        # the state written before the recompile drives the new program
        syn = pk.tcp("192.0.2.1", 1000, "10.244.9.7", 80)
        assert bpf.prog_test_run(fresh.to_container_fd, syn)[0] == 0
        assert bpf.prog_test_run(fresh.to_container_fd, pk.tcp("192.0.2.1", 1001, "10.244.9.7", 81))[0] == 2
        assert [e.endpoint_id for e in h.dp.list_endpoints()] == [7]
    finally:
        fresh.close()


async def test_packet_cost_bench_runs_and_cleans_up():
    import os

    from propolis_sandbox.bench.datapath import measure_packet_cost
    rows = await measure_packet_cost(sizes=(0, 200), repeat=1000)
    print("\n[bpf] packet cost:", rows)
    assert [r["policy_rows"] for r in rows] == [1, 201]
    assert all(r["established_ns_per_packet"] > 0 and r["new_denied_ns_per_packet"] > 0 for r in rows)
    assert not [d for d in os.listdir("/sys/fs/bpf/propolis") if d.startswith(f"bench-{os.getpid()}-")]
