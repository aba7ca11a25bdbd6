"""cilium_bpf_map_pressure: how full each map the datapath fills by itself is (0..1).

Why: conntrack, NAT, fragment and affinity maps are LRU hashes the programs fill per
connection; when one is full the kernel evicts its least recently used entries, and an
evicted established flow meets policy again or loses its reverse NAT. Cilium exports the
fill as `cilium_bpf_map_pressure{map_name}`; so does the datapath-writer's /metrics
(`MapPressureCollector`), computed on scrape with batch lookups (~1 ms per 10k entries).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily

from propolis.maps import conntrack, fragments, lb
from propolis.maps.spec import MapSpec

if TYPE_CHECKING:
    from propolis.datapath.datapath import Datapath

# maps the programs fill themselves (the writer's own maps are sized by what it writes)
PRESSURE_SPECS: tuple[MapSpec, ...] = (conntrack.TCP_SPEC, conntrack.ANY_SPEC, lb.SNAT_SPEC,
                                       lb.AFFINITY_SPEC, fragments.SPEC)


def map_pressure(dp: Datapath) -> dict[str, float]:
    """Entries / max_entries of every map in PRESSURE_SPECS, by pin name (Cilium's map_name)."""
    out: dict[str, float] = {}
    for spec in PRESSURE_SPECS:
        bpf_map = dp._map(spec.pin_name)
        entries = sum(n for _, _, n in lb.raw_batches(bpf_map))
        out[spec.pin_name] = entries / bpf_map.info().max_entries
    return out


class MapPressureCollector:
    """prometheus_client collector: one gauge sample per map, read when scraped."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    def describe(self) -> list[Any]:
        return [GaugeMetricFamily("cilium_bpf_map_pressure", "Fill of a BPF map (entries / max entries)",
                                  labels=["map_name"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("cilium_bpf_map_pressure", "Fill of a BPF map (entries / max entries)",
                                   labels=["map_name"])
        if self.dp.programs is not None:
            for name, value in map_pressure(self.dp).items():
                family.add_metric([name], value)
        yield family
