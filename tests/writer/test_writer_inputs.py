"""ClusterInputs: when the datapath-writer may act on what the bus says."""

from __future__ import annotations

from propolis.bus import subjects
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import Watermark
from propolis.writer.inputs import ClusterInputs

SYNCED = KvEvent(EventType.SYNCED)


def watermark(rv: int, epoch: str = "e1") -> KvEvent:
    return KvEvent(EventType.PUT, subjects.WATERMARK_KEY, Watermark(rv, 0.0, epoch), rv)


def test_synced_needs_initial_values_and_both_watermarks():
    inputs = ClusterInputs()
    inputs.apply_k8s(SYNCED)
    inputs.apply_identities(SYNCED)
    assert not inputs.synced  # empty buckets: their owners never ran
    inputs.apply_k8s(watermark(7))
    assert not inputs.synced
    inputs.apply_identities(watermark(7))
    assert inputs.synced and inputs.watermark == 7


def test_a_wiped_bucket_stops_acting_until_its_owner_refills_it():
    inputs = ClusterInputs()
    for apply in (inputs.apply_k8s, inputs.apply_identities):
        apply(SYNCED)
        apply(watermark(9))
    assert inputs.synced
    inputs.apply_k8s(KvEvent(EventType.DELETE, subjects.WATERMARK_KEY))  # NATS lost its storage
    assert not inputs.synced  # keep the kernel's last state (fail closed)
    inputs.apply_k8s(watermark(10))
    assert not inputs.synced  # the lost epoch's watermark does not say the bucket was refilled
    inputs.apply_k8s(watermark(10, epoch="e2"))
    assert inputs.synced and inputs.watermark == 9
