"""Bandwidth Manager: pod bandwidth annotations -> shapers on this node's pods (reconciler `bandwidth`).

Desired state is computed on every recompute from the mirrored pods of this node's endpoints
(`desired_bandwidth`); the target writes the two tbf qdiscs of `bandwidth/shaper.py` (egress on the
pod's eth0, ingress on its lxc) and lists what the kernel carries (our root qdisc on lxc interfaces of
the node, and on the eth0 of this node's pods), so a shaper left behind (annotation removed while no
writer ran, Bandwidth Manager turned off) is pruned. An annotation that does not parse fails its key
permanently with the annotation named: the pod keeps its last shaping until the annotation is fixed.
Inspect: `tc qdisc show` in the node namespace (`qdisc tbf 5050: root … rate 10Mbit`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from propolis.bandwidth.annotations import BandwidthLimits, pod_limits
from propolis.bandwidth.shaper import read_rate, set_rate, shaped_interfaces
from propolis.bus.messages import K8sObject
from propolis.errors import PermanentError, ValidationError
from propolis.writer.endpoints import LocalEndpoint


@dataclass(frozen=True)
class PodBandwidth:
    """What one pod's interfaces should shape to; `error` = its annotation did not parse."""

    pod: str  # namespace/name, for messages
    netns: str  # the pod's network namespace (path the CNI gave)
    ifname: str  # the pod's interface in it
    limits: BandwidthLimits = BandwidthLimits()
    error: str = ""


def desired_bandwidth(pods: Mapping[tuple[str, str], K8sObject],
                      endpoints: Iterable[LocalEndpoint]) -> dict[str, PodBandwidth]:
    """host ifname -> limits, for this node's endpoints whose pod carries a bandwidth annotation."""
    desired = {}
    for ep in endpoints:
        pod = pods.get((ep.namespace, ep.pod))
        annotations = (pod.fields.get("annotations") or {}) if pod is not None else {}
        name = f"{ep.namespace}/{ep.pod}"
        try:
            limits = pod_limits(annotations)
        except ValidationError as exc:
            desired[ep.host_ifname] = PodBandwidth(name, ep.netns, ep.ifname, error=f"pod {name}: {exc}")
            continue
        if limits:
            desired[ep.host_ifname] = PodBandwidth(name, ep.netns, ep.ifname, limits)
    return desired


class BandwidthTarget:
    """Key = the pod's host-side veth (lxc…) in the node namespace, value = `PodBandwidth`.
    `endpoints` = this node's endpoints (the writer's table, set on every recompute): where each pod's
    namespace is, for pruning a shaper whose pod no longer asks for one."""

    def __init__(self, node_netns: str | None) -> None:
        self.node_netns = node_netns
        self.endpoints: list[LocalEndpoint] = []

    async def update(self, key: str, desired: PodBandwidth) -> None:
        """Both directions at once (each opens a socket in its namespace). Unchanged rates are not
        rewritten (see `set_rate`), so this is also the drift repair."""
        if desired.error:
            raise PermanentError(desired.error)
        await asyncio.gather(set_rate(desired.netns, desired.ifname, desired.limits.egress),
                             set_rate(self.node_netns, key, desired.limits.ingress))

    async def delete(self, key: str) -> None:
        ep = self._endpoint(key)
        await asyncio.gather(set_rate(self.node_netns, key, 0), *([set_rate(ep.netns, ep.ifname, 0)] if ep else []))

    async def list_actual(self) -> Iterable[str]:
        """lxc interfaces with our qdisc, and those whose pod's eth0 has it (read from each pod's namespace)."""
        shaped = set(await shaped_interfaces(self.node_netns))
        for ep in list(self.endpoints):
            if ep.host_ifname not in shaped and await read_rate(ep.netns, ep.ifname) is not None:
                shaped.add(ep.host_ifname)
        return sorted(shaped)

    def _endpoint(self, host_ifname: str) -> LocalEndpoint | None:
        return next((e for e in self.endpoints if e.host_ifname == host_ifname), None)
