"""Fixtures for BPF program tests: one compile per session, clean maps per test.

The programs run on hand-built packets through BPF_PROG_TEST_RUN; the skb is on the
loopback device there, so test endpoints use ifindex 1.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

from propolis.datapath import Datapath
from propolis.maps import bpf, conntrack, endpoints, events, ipcache, metrics, policy
from propolis.maps.events import EventReader

TEST_IFINDEX = 1  # BPF_PROG_TEST_RUN puts the skb on loopback


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for BPF")


@pytest.fixture(scope="session")
def loaded_datapath() -> Iterator[Datapath]:
    """bpf_lxc.c compiled once for the session, pinned under a unique node dir."""
    _need_root()
    node = f"bpftest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    dp = Datapath(node)
    try:
        dp.load_sync()
        print(f"\n[bpf] compile+load of bpf_lxc.c: {dp.compile_seconds:.3f} s")
        yield dp
    finally:
        asyncio.run(dp.remove_all())
        assert not os.path.exists(dp.pin_dir)


class Harness:
    """A clean datapath plus helpers to run packets and read results."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.reader = EventReader(dp.pin_dir)

    def endpoint(self, endpoint_id: int, ip: str, identity: int, *, ingress: bool = False,
                 egress: bool = False) -> None:
        self.dp.upsert_endpoint(endpoint_id=endpoint_id, ip=ip, identity=identity, ifindex=TEST_IFINDEX,
                                ingress_enforced=ingress, egress_enforced=egress)

    def egress(self, packet: bytes) -> int:
        """Run cil_from_container (packet leaving the pod); returns the tc verdict."""
        assert self.dp.programs is not None
        return bpf.prog_test_run(self.dp.programs.from_container_fd, packet)[0]

    def ingress(self, packet: bytes) -> int:
        """Run cil_to_container (packet entering the pod)."""
        assert self.dp.programs is not None
        return bpf.prog_test_run(self.dp.programs.to_container_fd, packet)[0]

    def events(self):
        return self.reader.read()

    def metric(self, reason: int, direction: int) -> int:
        for row in self.dp.metrics():
            if row.reason == reason and row.direction == direction:
                return row.packets
        return 0

    def reset(self) -> None:
        dp = self.dp
        for spec in (endpoints.SPEC, ipcache.SPEC, policy.OUTER_SPEC, conntrack.TCP_SPEC,
                     conntrack.ANY_SPEC, metrics.SPEC, events.RATELIMIT_SPEC):
            dp._map(spec.pin_name).clear()
        for name in os.listdir(dp.pin_dir):
            if name.startswith("cilium_policy_v2_"):
                os.unlink(os.path.join(dp.pin_dir, name))
        dp._endpoints.clear()
        dp._policy_rows.clear()
        self.reader.read()

    def close(self) -> None:
        self.reader.close()


@pytest.fixture
def harness(loaded_datapath: Datapath) -> Iterator[Harness]:
    h = Harness(loaded_datapath)
    h.reset()
    try:
        yield h
    finally:
        h.reset()
        h.close()
