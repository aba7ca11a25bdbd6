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


def _fqdn(generation: int, *rows: tuple[str, str], node: str = "n1") -> KvEvent:
    from propolis.bus.messages import FqdnCacheRecord

    entries = [{"name": name, "ip": ip, "lookup_time": 0.0, "ttl": 60, "expires_at": 60.0} for name, ip in rows]
    return KvEvent(EventType.PUT, subjects.fqdn_key(node), FqdnCacheRecord(node, generation, entries), generation)


def test_the_fqdn_cache_holds_the_writer_until_read_then_feeds_learned_ips():
    inputs = ClusterInputs(fqdn_synced=False)  # the writer follows its node's dns-proxy cache
    for apply in (inputs.apply_k8s, inputs.apply_identities):
        apply(SYNCED)
        apply(watermark(3))
    assert not inputs.synced  # pruning now would drop every learned IP of a restarted writer
    inputs.apply_fqdn(_fqdn(4, ("s3.amazonaws.com.", "203.0.113.20"), ("s3.amazonaws.com.", "203.0.113.21"),
                            ("api.stripe.com.", "203.0.113.20")))
    inputs.apply_fqdn(SYNCED)
    assert inputs.synced and inputs.fqdn_generation == 4
    assert inputs.fqdn_ips == {"203.0.113.20": frozenset({"s3.amazonaws.com.", "api.stripe.com."}),
                               "203.0.113.21": frozenset({"s3.amazonaws.com."})}
    policy_generation = inputs.policy_generation
    inputs.apply_fqdn(_fqdn(5, ("s3.amazonaws.com.", "203.0.113.20"), ("s3.amazonaws.com.", "203.0.113.21"),
                            ("api.stripe.com.", "203.0.113.20")))
    assert inputs.fqdn_generation == 5 and inputs.policy_generation == policy_generation  # same IPs: no recompile
    inputs.apply_fqdn(KvEvent(EventType.PUT, subjects.fqdn_key("n1"), watermark(1).value, 6))  # poison
    assert inputs.fqdn_generation == 5 and len(inputs.fqdn_ips) == 2  # the last good record stays
    inputs.apply_fqdn(KvEvent(EventType.DELETE, subjects.fqdn_key("n1")))
    assert inputs.fqdn_ips == {} and inputs.policy_generation > policy_generation
