"""Every ctypes mirror in propolis.maps has the layout bcc compiled for its C struct."""

from __future__ import annotations

import ctypes
import os

import pytest

from propolis.maps import ALL_SPECS, bpf, events, policy

pytestmark = pytest.mark.root


def layout(ctype: type) -> list[tuple[str, int, int, object]]:
    """(field, offset, size, nested layout) recursively; anonymous padding fields of bcc skipped."""
    if not (isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))):
        return []
    rows = []
    for name, ftype, *_ in ctype._fields_:
        if name.startswith("__pad"):
            continue
        desc = getattr(ctype, name)
        rows.append((name, desc.offset, desc.size, layout(ftype)))
    return rows


def same(ours: type, bccs: type) -> None:
    assert ctypes.sizeof(ours) == ctypes.sizeof(bccs), (ours, ctypes.sizeof(ours), ctypes.sizeof(bccs))
    assert layout(ours) == layout(bccs), (ours, layout(ours), layout(bccs))


KEYED = [s for s in ALL_SPECS if s.map_type != bpf.BPF_MAP_TYPE_RINGBUF] + [policy.INNER_SPEC]


@pytest.mark.parametrize("spec", KEYED, ids=lambda s: s.pin_name)
def test_map_layout_matches_bcc(loaded_datapath, spec):
    table = loaded_datapath.programs.table(spec.c_name)
    same(spec.key_type, table.Key)
    if spec.map_type != bpf.BPF_MAP_TYPE_HASH_OF_MAPS:
        same(spec.value_type, getattr(table, "sLeaf", table.Leaf))  # per-CPU: one CPU's value


def pinned_as(path: str, spec) -> None:
    with bpf.BpfMap.open_pinned(path, spec.key_type, spec.value_type, percpu=spec.percpu) as bpf_map:
        info = bpf_map.info()
    assert (info.type, info.max_entries) == (spec.map_type, spec.max_entries)
    assert (info.key_size, info.value_size) == (ctypes.sizeof(spec.key_type), ctypes.sizeof(spec.value_type))


@pytest.mark.parametrize("spec", [s for s in KEYED if s is not policy.INNER_SPEC], ids=lambda s: s.pin_name)
def test_pinned_map_matches_spec(loaded_datapath, spec):
    pinned_as(spec.path(loaded_datapath.pin_dir), spec)


def test_an_endpoints_pinned_policy_map_matches_the_inner_spec(harness):
    """Inner maps are pinned per endpoint (cilium_policy_v2_<id>), once it has a policy."""
    from propolis.datapath import PolicyEntry

    harness.endpoint(11, "10.244.1.10", 1001, ingress=True)
    harness.dp.set_policy(11, [PolicyEntry("ingress", identity=1002, protocol=6, port=80)])
    pinned_as(os.path.join(harness.dp.pin_dir, policy.inner_pin_name(11)), policy.INNER_SPEC)


def test_flow_event_record_is_the_c_struct(loaded_datapath):
    """The ring buffer has no Key/Leaf: compare with the C struct through bcc's struct parser."""
    from bcc import BPF

    text = "#include <linux/types.h>\n" + _struct_source("flow_event")
    probe = BPF(text=(text + "\nBPF_HASH(probe, int, struct flow_event, 1);\n").encode())
    try:
        same(events.FlowEventRecord, probe[b"probe"].Leaf)
    finally:
        probe.cleanup()


def _struct_source(name: str) -> str:
    from propolis.datapath.loader import bpf_source_dir
    maps_h = (bpf_source_dir() / "lib" / "maps.h").read_text()
    union = maps_h[maps_h.index("union l3addr {"): maps_h.index("};", maps_h.index("union l3addr {")) + 2]
    start = maps_h.index(f"struct {name} {{")
    return union + "\n" + maps_h[start: maps_h.index("};", start) + 2]


def test_incompatible_pinned_map_is_refused_not_flushed(tmp_path):
    """A pin whose layout this build cannot read stops the load instead of being replaced."""
    import os
    import uuid

    from propolis.datapath.loader import check_pins
    from propolis.errors import PermanentError
    from propolis.maps import endpoints

    if os.geteuid() != 0:
        pytest.skip("needs root for BPF")
    pin_dir = f"/sys/fs/bpf/propolis/layouttest-{uuid.uuid4().hex[:8]}"
    os.makedirs(pin_dir)
    try:
        fd = bpf.create_map(bpf.BPF_MAP_TYPE_HASH, 8, 8, 16, name="wrong")
        bpf.obj_pin(fd, endpoints.SPEC.path(pin_dir))
        os.close(fd)
        with pytest.raises(PermanentError, match="cilium_lxc"):
            check_pins(pin_dir)
        assert os.path.exists(endpoints.SPEC.path(pin_dir))
    finally:
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)
