"""Bandwidth Manager with real TCP in a sandbox running the whole suite (`enable-bandwidth-manager` is on
in the sandbox), and the seed's `bandwidth-limit` CiliumNetworkPolicy verbatim.

Rates are measured between pods on different nodes with `bandwidth/measure.py` (a bounded transfer,
goodput counted at the receiver after a warm-up). The only assertion on a measurement is the issue's
accuracy band: within ±10 % of the annotation. A measurement is a sample: one that falls outside is
taken again (at most `ATTEMPTS`), and the failure lists every sample.

Workload (namespace `bw-…`): sender (node 1, egress-bandwidth) -> sink (node 2); source (node 2) ->
receiver (node 1, ingress-bandwidth). Node 1's kernel state is read back with `bandwidth/shaper.py`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy"))  # one workload helper, not two

from policy_workload import NO, OK, PodDef, Workload

from propolis.bandwidth.annotations import EGRESS_BANDWIDTH, INGRESS_BANDWIDTH
from propolis.bandwidth.shaper import read_rate, shaped_interfaces
from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox import cluster
from propolis_sandbox.bandwidth_measure import measure_tcp_rate
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root

TOLERANCE = 0.10
ATTEMPTS = 3
SECONDS = 3.0

#: the seed's example, verbatim (tests/policy/test_policy_compile.py compiles the same text)
SEED_BANDWIDTH_LIMIT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bandwidth-limit
spec:
  endpointSelector:
    matchLabels:
      app: data-processor
  egressDeny:
  - toPorts:
    - ports:
      - port: "0"
"""


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def pods(egress: str | None, ingress: str | None) -> list[PodDef]:
    return [PodDef("bw/sender", 1, {"app": "sender"}, annotations=((EGRESS_BANDWIDTH, egress),) if egress else ()),
            PodDef("bw/sink", 2, {"app": "sink"}),
            PodDef("bw/source", 2, {"app": "source"}),
            PodDef("bw/receiver", 1, {"app": "receiver"},
                   annotations=((INGRESS_BANDWIDTH, ingress),) if ingress else ())]


async def annotate(w: Workload, egress: str | None, ingress: str | None) -> None:
    """Re-apply sender and receiver with new annotations (the pods are updated in place, not recreated)."""
    changed = [p for p in pods(egress, ingress) if p.name in ("sender", "receiver")]
    w.pods = [p for p in w.pods if p.name not in ("sender", "receiver")] + changed
    await cluster.apply_documents(w.state, w.documents([w._pod(p) for p in changed], "annotate"),
                                  dry_run_first=False)


async def node1_rates(w: Workload) -> tuple[int | None, set[int | None]]:
    """(the sender's eth0 rate, the rates of every shaped lxc on node 1) as the kernel has them."""
    node = w.state.sandbox().node_netns(1)
    ingress = {await read_rate(node, ifname) for ifname in await shaped_interfaces(node)}
    return await read_rate(w.netns("bw/sender"), "eth0"), ingress


async def applied_after(w: Workload, want: tuple[int | None, set[int | None]], timeout: float = 30.0) -> float:
    """Seconds until node 1's kernel shows `want` (how fast a change takes effect; printed, not asserted)."""
    started = time.monotonic()
    while (got := await node1_rates(w)) != want:
        assert time.monotonic() - started < timeout, f"node 1 shapes {got}, expected {want}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def within_band(w: Workload, client: str, server: str, target: int, streams: int) -> str:
    """'' if a measurement client -> server is within ±10 % of `target`, else every sample taken."""
    samples = []
    for _ in range(ATTEMPTS):
        got = await measure_tcp_rate(client_netns=w.netns(client), server_netns=w.netns(server),
                                     server_ip=w.ip(server), streams=streams, seconds=SECONDS)
        samples.append(got.bits_per_second)
        error = got.bits_per_second / target - 1
        print(f"{client} -> {server} {streams} stream(s): target {target / 1e6:.0f} Mbit/s, measured "
              f"{got.bits_per_second / 1e6:.2f} Mbit/s ({error:+.1%})")
        if abs(error) <= TOLERANCE:
            return ""
    return (f"{client} -> {server}, {streams} stream(s), target {target / 1e6:.0f} Mbit/s: "
            f"{', '.join(f'{s / 1e6:.2f}' for s in samples)} Mbit/s")


async def measure_both_directions(w: Workload, target: int) -> list[str]:
    failures = []
    for streams in (1, 4):
        failures.append(await within_band(w, "bw/sender", "bw/sink", target, streams))  # egress-bandwidth
        failures.append(await within_band(w, "bw/source", "bw/receiver", target, streams))  # ingress-bandwidth
    return [f for f in failures if f]


async def test_pods_are_shaped_to_their_annotations_and_follow_changes(sandbox):
    async with Workload(sandbox, "bw", {"bw": {}}, pods("10M", "10M")) as w:
        await cluster.wait(sandbox, timeout=60)
        assert await node1_rates(w) == (10**7, {10**7})
        failures = await measure_both_directions(w, 10**7)

        await annotate(w, "100M", "100M")
        print(f"10M -> 100M in the kernel {await applied_after(w, (10**8, {10**8})):.3f}s after the API write")
        failures += await measure_both_directions(w, 10**8)

        await annotate(w, None, None)
        print(f"annotations removed: unshaped {await applied_after(w, (None, set())):.3f}s after the API write")
        assert not failures, "\n" + "\n".join(failures)


async def test_a_bad_annotation_is_reported_and_the_last_shaping_kept(sandbox):
    async with Workload(sandbox, "bwbad", {"bw": {}}, pods("10M", None)) as w:
        await cluster.wait(sandbox, timeout=60)
        await annotate(w, "10Q", None)
        await cluster.wait(sandbox, timeout=60)
        node = sandbox.nodes[0]["name"]
        bus = sandbox.admin_bus("bandwidth-test")
        await bus.connect(max_wait=5)
        try:
            deadline = time.monotonic() + 30
            while True:  # the next heartbeat after the failed attempt
                beat = newest(await read_heartbeats(bus), "datapath-writer", node)
                reason = (beat.components.get("bandwidth") or {}).get("reason", "") if beat else ""
                if EGRESS_BANDWIDTH in reason:
                    break
                assert time.monotonic() < deadline, f"writer on {node} never reported the bad annotation: {beat}"
                await asyncio.sleep(0.2)
        finally:
            await bus.close()
        assert "'10Q' is not a Kubernetes quantity" in reason and f"{w.ns('bw')}/sender" in reason
        assert (await node1_rates(w))[0] == 10**7  # never more open because of a typo

        await annotate(w, "20M", None)
        await applied_after(w, (2 * 10**7, set()))


async def test_seed_bandwidth_limit_policy_denies_all_egress_of_its_pods(sandbox):
    """egressDeny with port "0" is every port and protocol, to every peer (Cilium's meaning); ingress and
    other pods are untouched."""
    ports = (("http", 8080, "TCP"), ("metrics", 9090, "TCP"), ("dns", 5353, "UDP"))
    workload = [PodDef("bw/processor", 1, {"app": "data-processor"}, server=True, ports=ports),
                PodDef("bw/server", 2, {"app": "server"}, server=True, ports=ports),
                PodDef("bw/other", 1, {"app": "other"}, server=True, ports=ports)]
    everything = [("bw/processor", "bw/server", 8080, "TCP"), ("bw/processor", "bw/server", 5353, "UDP"),
                  ("bw/processor", "bw/other", 9090, "TCP")]
    untouched = [("bw/other", "bw/server", 8080, "TCP", OK), ("bw/server", "bw/processor", 8080, "TCP", OK),
                 ("bw/other", "bw/processor", 5353, "UDP", OK)]
    policy = yaml.safe_load(SEED_BANDWIDTH_LIMIT)
    policy["metadata"]["namespace"] = "bw"  # `kubectl apply -n`: the manifest itself is the seed's
    async with Workload(sandbox, "bwpol", {"bw": {}}, workload) as w:
        failures = await w.step("no policy", [(*c, OK) for c in everything] + untouched)
        failures += await w.step("bandwidth-limit", [(*c, NO) for c in everything] + untouched, apply=[policy])
        failures += await w.step("deleted", [(*c, OK) for c in everything] + untouched, delete=[policy])
        assert not failures, "\n" + "\n".join(failures)
