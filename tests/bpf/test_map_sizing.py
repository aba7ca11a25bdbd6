"""Conntrack and NAT sized from memory like Cilium's bpf.mapDynamicSizeRatio (issue 20, item 6):
Cilium's own examples for the formula, its minimums, and a datapath loaded with a ratio has
maps of those sizes (the fixed 64k/32k conntrack maps filled under load)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import uuid

import pytest

from propolis.datapath import Datapath
from propolis.datapath.datapath import DatapathSettings
from propolis.errors import ValidationError
from propolis.maps import conntrack, lb
from propolis.maps.sizing import dynamic_sizes

GIB = 1 << 30


def test_ratio_of_memory_spread_like_cilium():
    # the share of memory is spread over the maps in proportion to Cilium's defaults
    sizes = dynamic_sizes(0.0025, 64 * GIB)
    tcp, any_, nat = (sizes[s.pin_name] for s in (conntrack.TCP_SPEC, conntrack.ANY_SPEC, lb.SNAT_SPEC))
    assert tcp == nat == 2 * any_ + (tcp % 2) and tcp > 524_288
    used = sum(sizes[s.pin_name] * (ctypes.sizeof(s.key_type) + ctypes.sizeof(s.value_type))
               for s in (conntrack.TCP_SPEC, conntrack.ANY_SPEC, lb.SNAT_SPEC))
    assert used == pytest.approx(0.0025 * 64 * GIB, rel=0.001)
    assert dynamic_sizes(0.0025, 128 * GIB)[conntrack.TCP_SPEC.pin_name] == pytest.approx(2 * tcp, rel=0.001)
    assert dynamic_sizes(1.0, 1 << 50)[conntrack.TCP_SPEC.pin_name] == 1 << 24  # LimitTableMax
    small = dynamic_sizes(0.0025, GIB // 4)
    assert (small[conntrack.TCP_SPEC.pin_name], small[conntrack.ANY_SPEC.pin_name],
            small[lb.SNAT_SPEC.pin_name]) == (131_072, 65_536, 131_072)  # Cilium's minimums
    assert dynamic_sizes(0.0) == {}
    with pytest.raises(ValidationError) as err:
        DatapathSettings(map_dynamic_size_ratio=1.5)
    assert err.value.field == "map_dynamic_size_ratio"


@pytest.mark.root
def test_a_datapath_loaded_with_a_ratio_has_those_sizes():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    settings = DatapathSettings(map_dynamic_size_ratio=0.0001)
    want = settings.map_sizes
    dp = Datapath(f"bpfsize-{os.getpid()}-{uuid.uuid4().hex[:6]}", settings=settings)
    try:
        dp.load_sync()
        for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC, lb.SNAT_SPEC):
            assert dp._map(spec.pin_name).info().max_entries == want[spec.pin_name] > spec.max_entries
    finally:
        asyncio.run(dp.remove_all())
