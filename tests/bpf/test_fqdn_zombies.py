"""Learned IPs still in use: the dns-proxy reads the node's real conntrack maps (zombies, Cilium's
DNSZombieMappings): an address in an unexpired entry stays past its TTL, one only in expired entries goes."""

from __future__ import annotations

from socket import htons

from propolis.fqdn.cache import FqdnCache
from propolis.fqdn.service import live_addresses
from propolis.maps import conntrack
from propolis.maps.spec import ip4_to_be32


def _entry(harness, spec, src: str, dst: str, lifetime: int, proto: int) -> None:
    key = conntrack.CtTuple4(saddr=ip4_to_be32(src), daddr=ip4_to_be32(dst), sport=htons(40000), dport=htons(443),
                             nexthdr=proto, flags=conntrack.CT_EGRESS)
    harness.dp._map(spec.pin_name).update(key, conntrack.CtEntry(lifetime=lifetime))


def test_an_expired_name_whose_address_carries_a_live_connection_stays_as_a_zombie(harness):
    now = conntrack.now_seconds()
    _entry(harness, conntrack.TCP_SPEC, "10.244.1.5", "203.0.113.20", now + 300, 6)   # a live TCP connection
    _entry(harness, conntrack.ANY_SPEC, "10.244.1.5", "203.0.113.30", now - 1, 17)    # an expired UDP flow
    live = live_addresses(harness.dp.pin_dir)
    assert "203.0.113.20" in live and "203.0.113.30" not in live
    cache = FqdnCache()
    cache.update("s3.amazonaws.com", ["203.0.113.20", "203.0.113.21"], ttl=1, now=0.0)
    cache.update("api.stripe.com", ["203.0.113.30"], ttl=1, now=0.0)
    removed = cache.expire(10.0, alive=live.__contains__)
    assert sorted(removed) == [("api.stripe.com.", "203.0.113.30"), ("s3.amazonaws.com.", "203.0.113.21")]
    assert [(e.ip, e.zombie) for e in cache.dump()] == [("203.0.113.20", True)]
    assert live_addresses("/nonexistent/pin/dir") == set()  # no datapath pinned: nothing is in use
