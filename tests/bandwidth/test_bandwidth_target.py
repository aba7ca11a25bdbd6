"""The Bandwidth Manager's reconciler target on real interfaces: a pod namespace joined by a veth to a
"node" namespace, as the CNI plugin wires it. Shapers are written, changed, removed, repaired after a
hand edit, pruned when nobody desires them, and kept when the annotation turns bad."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from propolis.bandwidth.annotations import BandwidthLimits
from propolis.bandwidth.shaper import read_rate, set_rate
from propolis.reconcile import Reconciler, Status
from propolis.writer.bandwidth import BandwidthTarget, PodBandwidth
from propolis.writer.endpoints import LocalEndpoint

pytestmark = pytest.mark.root


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def wired():
    """(node netns, endpoint) with lxc<->eth0 like a CNI ADD; both namespaces deleted afterwards."""
    tag = uuid.uuid4().hex[:6]
    node, pod = f"pp-bwt-{tag}-n", f"pp-bwt-{tag}-p"
    host_if = f"lxc{tag}"
    try:
        ip("netns", "add", node)
        ip("netns", "add", pod)
        ip("-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod)
        yield node, LocalEndpoint(endpoint_id=1, container_id="c", namespace="ns", pod="p", ip="10.244.1.5",
                                  ifindex=0, host_ifname=host_if, netns=f"/var/run/netns/{pod}")
    finally:
        for ns in (node, pod):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def shaping(node: str, ep: LocalEndpoint):
    async def rates() -> tuple[int | None, int | None]:
        return await read_rate(ep.netns, ep.ifname), await read_rate(node, ep.host_ifname)
    return rates


def limits(egress: int = 0, ingress: int = 0, ep: LocalEndpoint | None = None) -> PodBandwidth:
    assert ep is not None
    return PodBandwidth("ns/p", ep.netns, ep.ifname, BandwidthLimits(egress=egress, ingress=ingress))


async def test_shapers_follow_the_desired_limits(wired, running):
    node, ep = wired
    rates = shaping(node, ep)
    target = BandwidthTarget(node)
    target.endpoints = [ep]
    rec = running(Reconciler("bandwidth", target))
    assert await rec.wait_until_reconciled(rec.upsert(ep.host_ifname, limits(10**7, 10**8, ep))) == {}
    assert await rates() == (10**7, 10**8)
    assert await rec.wait_until_reconciled(rec.upsert(ep.host_ifname, limits(10**8, 0, ep))) == {}
    assert await rates() == (10**8, None)
    assert await rec.wait_until_reconciled(rec.remove(ep.host_ifname)) == {}
    assert await rates() == (None, None)


async def test_a_bad_annotation_fails_its_key_and_keeps_the_last_shaping(wired, running):
    node, ep = wired
    target = BandwidthTarget(node)
    target.endpoints = [ep]
    rec = running(Reconciler("bandwidth", target))
    await rec.wait_until_reconciled(rec.upsert(ep.host_ifname, limits(10**7, 10**7, ep)))
    bad = PodBandwidth("ns/p", ep.netns, ep.ifname, error="pod ns/p: kubernetes.io/egress-bandwidth: '1x' is not …")
    failed = await rec.wait_until_reconciled(rec.upsert(ep.host_ifname, bad))
    assert "kubernetes.io/egress-bandwidth" in failed[ep.host_ifname]
    assert rec.status[ep.host_ifname].status is Status.FAILED
    assert await shaping(node, ep)() == (10**7, 10**7)


async def test_refresh_repairs_a_removed_shaper_and_prunes_one_nobody_desires(wired, running):
    node, ep = wired
    target = BandwidthTarget(node)
    target.endpoints = [ep]
    rec = Reconciler("bandwidth", target, refresh_interval=0.2)
    await set_rate(ep.netns, ep.ifname, 5 * 10**6)  # left by a previous writer: nobody desires it
    await rec.reconcile_once()
    assert await shaping(node, ep)() == (5 * 10**6, None)  # not synced yet: kept
    rec.mark_synced()
    await rec.reconcile_once()
    await rec.reconcile_once()
    assert await shaping(node, ep)() == (None, None)

    running(rec)
    await rec.wait_until_reconciled(rec.upsert(ep.host_ifname, limits(10**7, 2 * 10**7, ep)))
    subprocess.run(["ip", "netns", "exec", node, "tc", "qdisc", "del", "dev", ep.host_ifname, "root"], check=True)
    assert await read_rate(node, ep.host_ifname) is None
    done = rec.refreshes
    while rec.refreshes < done + 2:  # one full round after the hand edit, whatever the timing
        await rec.wait_until_reconciled(timeout=5)
        await asyncio.sleep(0.05)
    assert await shaping(node, ep)() == (10**7, 2 * 10**7)


async def test_rates_are_kept_in_whole_bytes_per_second_and_read_back_so(wired):
    node, ep = wired
    await set_rate(node, ep.host_ifname, 1_500_003)  # 187,500 bytes/s in the kernel
    await set_rate(node, ep.host_ifname, 1_500_003)  # compared in whole bytes: seen as unchanged
    shown = subprocess.run(["ip", "netns", "exec", node, "tc", "qdisc", "show", "dev", ep.host_ifname],
                           capture_output=True, text=True, check=True).stdout
    assert await read_rate(node, ep.host_ifname) == 1_500_000 and "rate 1500Kbit" in shown
