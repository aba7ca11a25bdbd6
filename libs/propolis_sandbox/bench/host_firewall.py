"""`propolis bench node`, part host firewall: what the host program costs a packet to the node.

BPF_PROG_TEST_RUN of cil_from_netdev (the kernel's own repeat loop, p50 over rounds) on a throw-away node
(unique pin dir, removed afterwards), three ways: no host endpoint (host firewall off: one lookup), the host
endpoint without policy (tracked, not judged), and the seed's `host-firewall` rows enforced. Per way an
established connection (conntrack hit) and, with the policy, a new connection it denies (ipcache + two
policy lookups every time; a new allowed one cannot repeat: its first run creates the conntrack entry).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from propolis.datapath import packets as pk
from propolis.datapath.datapath import Datapath, DatapathSettings
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.maps import bpf
from propolis.maps.endpoints import HOST_ENDPOINT_ID
from propolis.model.identity import RESERVED_HOST, RESERVED_REMOTE_NODE
from propolis.model.types import NumericIdentity
from propolis_sandbox.bench.common import percentile

_NODE, _OTHER_NODE, _WORLD = "172.31.0.1", "172.31.0.2", "198.51.100.9"
_CIDR_IDENTITY = NumericIdentity(1 << 24)
#: the seed's host-firewall as rows: 10250 from the cluster's reserved identities, 22 from 10.0.0.0/8
_SEED_ROWS = [PolicyEntry("ingress", identity=i, protocol=6, port=10250) for i in (1, 3, 4, 5, 6, 7, 8)] + \
             [PolicyEntry("ingress", identity=_CIDR_IDENTITY, protocol=6, port=22)]


async def measure_host_packet_cost(repeat: int = 100_000, rounds: int = 5) -> list[dict[str, Any]]:
    dp = Datapath(f"bench-host-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(monitor_aggregation="maximum"))
    rows: list[dict[str, Any]] = []

    def run(frame: bytes) -> list[int]:
        assert dp.programs is not None
        return [bpf.prog_test_run(dp.programs.from_netdev_fd, frame, repeat=repeat)[1] for _ in range(rounds)]

    try:
        await dp.load()
        dp.set_ipcache([IPCacheEntry(_NODE, RESERVED_HOST), IPCacheEntry(_OTHER_NODE, RESERVED_REMOTE_NODE),
                        IPCacheEntry("10.0.0.0/8", _CIDR_IDENTITY)])
        for way in ("no host endpoint", "host endpoint, no policy", "seed host-firewall enforced"):
            if way != "no host endpoint":
                dp.set_host_endpoint(_NODE, 1)
            if way.startswith("seed"):
                dp.set_policy(HOST_ENDPOINT_ID, _SEED_ROWS)
                dp.set_enforcement(HOST_ENDPOINT_ID, ingress=True, egress=False)
            sport = 40000 + len(rows)
            assert dp.programs is not None
            bpf.prog_test_run(dp.programs.from_netdev_fd, pk.tcp(_OTHER_NODE, sport, _NODE, 10250))  # tracked
            established = run(pk.tcp(_OTHER_NODE, sport, _NODE, 10250, pk.TCP_ACK))
            row: dict[str, Any] = {"way": way, "repeat": repeat, "rounds": rounds,
                                   "established_ns_per_packet": percentile(established, 50),
                                   "established_ns_p99": percentile(established, 99)}
            if way.startswith("seed"):
                denied = run(pk.tcp(_WORLD, sport, _NODE, 22))
                row.update(new_denied_ns_per_packet=percentile(denied, 50), new_denied_ns_p99=percentile(denied, 99))
            rows.append(row)
    finally:
        await dp.remove_all()
    return rows
