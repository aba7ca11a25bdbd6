"""FQDN cache retention: TTL with its floor, the per-hostname cap, zombies kept while connections live, restore."""

from __future__ import annotations

from propolis.fqdn.cache import FqdnCache
from propolis.model.matchpattern import FqdnSelector


def test_ttl_and_min_ttl():
    cache = FqdnCache(min_ttl=10)
    assert cache.update("S3.amazonaws.com", ["203.0.113.20", "203.0.113.21"], ttl=1, now=100) == \
        ["203.0.113.20", "203.0.113.21"]
    assert cache.update("s3.amazonaws.com.", ["203.0.113.20"], ttl=1, now=101) == []  # known: nothing new
    assert cache.expire(now=109) == []
    assert sorted(cache.expire(now=111)) == [("s3.amazonaws.com.", "203.0.113.20"), ("s3.amazonaws.com.", "203.0.113.21")]
    assert cache.dump() == []


def test_max_ips_per_hostname_evicts_the_soonest_expiring():
    cache = FqdnCache(max_ips_per_hostname=2)
    cache.update("r.example.net", ["203.0.113.40"], ttl=5, now=0)
    cache.update("r.example.net", ["203.0.113.41"], ttl=5, now=1)
    assert cache.update("r.example.net", ["203.0.113.42"], ttl=5, now=2) == ["203.0.113.42"]
    assert {e.ip for e in cache.dump()} == {"203.0.113.41", "203.0.113.42"}


def test_zombies_live_while_connections_do_then_for_the_grace_period():
    cache = FqdnCache(idle_connection_grace_s=30)
    cache.update("api.stripe.com", ["203.0.113.30"], ttl=1, now=0)
    assert cache.expire(now=5, alive=lambda ip: True) == []
    assert cache.dump()[0].zombie
    assert cache.ips_for(FqdnSelector(match_name="api.stripe.com")) == {"203.0.113.30"}
    assert cache.expire(now=20) == []  # idle, but within the grace period
    assert cache.expire(now=40) == [("api.stripe.com.", "203.0.113.30")]


def test_restore_round_trip_and_lookups():
    cache = FqdnCache()
    cache.update("s3.amazonaws.com", ["203.0.113.20"], ttl=60, now=0)
    cache.update("ec2.us-east-1.amazonaws.com", ["203.0.113.22"], ttl=60, now=0)
    again = FqdnCache()
    again.restore(cache.to_json() + [{"garbage": 1}])
    assert again.to_json() == cache.to_json()
    assert again.ips_for(FqdnSelector(match_pattern="*.amazonaws.com")) == {"203.0.113.20"}
    assert again.names_for("203.0.113.22") == ["ec2.us-east-1.amazonaws.com."]
