"""Per-packet cost of bpf_lxc through BPF_PROG_TEST_RUN, for `propolis bench policy` (issue 5, item 3).

Why here: the measurement needs the datapath's own maps and packet builders; the bench
command only formats. It loads a throw-away node (unique pin dir, removed afterwards),
seeds N ipcache rows and N policy rows for one endpoint, and times two paths with the
kernel's own repeat loop: an established flow (conntrack hit, no policy lookup) and a
new connection that policy denies (ipcache + two policy LPM lookups every time).
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from typing import Any

from propolis.datapath import packets as pk
from propolis.datapath.datapath import Datapath, DatapathSettings
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.maps import bpf

_POD = "10.200.0.10"
_PEER = "10.201.0.1"
_ENDPOINT = 1


async def measure_packet_cost(sizes: tuple[int, ...] = (0, 10_000), repeat: int = 100_000) -> list[dict[str, Any]]:
    """ns/packet for each map size, side by side in one run."""
    dp = Datapath(f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(monitor_aggregation="maximum"))
    results: list[dict[str, Any]] = []
    try:
        await dp.load()
        assert dp.programs is not None
        net = ipaddress.ip_network("10.128.0.0/9")
        for size in sizes:
            dp.upsert_endpoint(endpoint_id=_ENDPOINT, ip=_POD, identity=1000, ifindex=1,
                               ingress_enforced=True, egress_enforced=False)
            cache = [IPCacheEntry(str(net.network_address + i * 4) + "/30", 100_000 + i) for i in range(size)]
            dp.set_ipcache([*cache, IPCacheEntry(_PEER, 99)])
            dp.set_policy(_ENDPOINT, [PolicyEntry("ingress", identity=100_000 + i, protocol=6, port=80 + i % 1000)
                                      for i in range(size)] + [PolicyEntry("ingress", identity=99, protocol=6, port=443)])
            allowed = pk.tcp(_PEER, 40000, _POD, 443)
            bpf.prog_test_run(dp.programs.to_container_fd, allowed)  # creates the CT entry
            _, established_ns, _ = bpf.prog_test_run(dp.programs.to_container_fd,
                                                     pk.tcp(_PEER, 40000, _POD, 443, pk.TCP_ACK), repeat=repeat)
            _, denied_ns, _ = bpf.prog_test_run(dp.programs.to_container_fd,
                                                pk.tcp(_PEER, 40001, _POD, 444), repeat=repeat)
            results.append({"policy_rows": size + 1, "ipcache_rows": size + 1, "repeat": repeat,
                            "established_ns_per_packet": established_ns, "new_denied_ns_per_packet": denied_ns})
            dp.set_policy(_ENDPOINT, [])
            dp.set_ipcache([])
    finally:
        await dp.remove_all()
    return results
