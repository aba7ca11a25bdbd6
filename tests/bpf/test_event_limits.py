"""Datapath events under a flood (issue 20, item 10), on crafted packets (BPF_PROG_TEST_RUN):
every denied packet writes a policy verdict and a drop record into the one ring all pods
share, so one flooded pod used to starve every other pod's events, and a loss said nothing
about what was lost. Now each endpoint has its own token bucket (Cilium's
bpf.events.default.rateLimit / burstLimit, per endpoint) and losses are counted per event
type and cause."""

from __future__ import annotations

import dataclasses

import pytest

from propolis.datapath import IPCacheEntry
from propolis.datapath import packets as pk
from propolis.errors import ValidationError
from propolis.maps import events

pytestmark = pytest.mark.root

SHOT = 2
POD_A, POD_B, REMOTE = "10.244.1.10", "10.244.1.20", "10.244.2.30"
EP_A, EP_B = 11, 22
BURST = 10


@pytest.fixture
def limited(harness):
    dp = harness.dp
    before = dp.settings
    dp.apply_settings(dataclasses.replace(before, events_rate_limit=1, events_burst_limit=BURST))
    try:
        yield harness
    finally:
        dp.apply_settings(before)


def test_a_flooded_endpoint_does_not_starve_the_others(limited):
    h = limited
    h.endpoint(EP_A, POD_A, 1001, egress=True)   # egress deny-all: every packet denied
    h.endpoint(EP_B, POD_B, 1002, egress=True)
    h.dp.set_ipcache([IPCacheEntry(REMOTE, 1003)])
    lost_before = h.reader.lost_by_type()
    for port in range(200):
        assert h.egress(pk.udp(POD_A, 10000 + port, REMOTE, 53)) == SHOT
    assert h.egress(pk.udp(POD_B, 20000, REMOTE, 53)) == SHOT
    got = h.events()
    per_endpoint = {ep: [e.type for e in got if e.endpoint_id == ep] for ep in (EP_A, EP_B)}
    # A: its burst (verdict + drop per packet) and at most a token or two of refill
    assert BURST <= len(per_endpoint[EP_A]) <= BURST + 2
    # B still reports its one denied packet completely
    assert sorted(per_endpoint[EP_B]) == [events.CILIUM_NOTIFY_DROP, events.CILIUM_NOTIFY_POLICY_VERDICT]
    lost = h.reader.lost_by_type()
    limited_now = {t: lost.get(t, {}).get("rate_limited", 0) - lost_before.get(t, {}).get("rate_limited", 0)
                   for t in ("drop", "policy-verdict")}
    assert sum(limited_now.values()) == 400 - len(per_endpoint[EP_A])
    assert limited_now["drop"] > 0 and limited_now["policy-verdict"] > 0
    assert all(v.get("ring_full", 0) == lost_before.get(t, {}).get("ring_full", 0) for t, v in lost.items())
    # metrics still count every drop: only the events are limited
    assert h.metric(133, 2) == 201


def test_no_limit_by_default_and_limits_are_validated(harness):
    h = harness
    h.endpoint(EP_A, POD_A, 1001, egress=True)
    for port in range(50):
        h.egress(pk.udp(POD_A, 10000 + port, REMOTE, 53))
    assert len([e for e in h.events() if e.endpoint_id == EP_A]) == 100
    with pytest.raises(ValidationError) as err:
        h.dp.apply_settings(dataclasses.replace(h.dp.settings, events_rate_limit=-1))
    assert err.value.field == "events_rate_limit"
