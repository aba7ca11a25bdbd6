"""Policy audit mode in bpf_lxc (BPF_PROG_TEST_RUN): a would-be drop is forwarded and reported as AUDIT."""

from __future__ import annotations

import pytest

from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk
from propolis.maps import drop, events

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT = 0, 2
POD, PEER = "10.244.1.20", "10.244.2.30"
ID_POD, ID_PEER = 1002, 1003
EP = 22
AUDIT, FORWARDED, DROPPED = 4, 1, 2


def _verdicts(h) -> list[events.FlowEvent]:
    return [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]


def test_audit_forwards_what_policy_would_drop_and_reports_it(harness):
    h = harness
    h.endpoint(EP, POD, ID_POD, ingress=True)
    h.dp.set_ipcache([IPCacheEntry(POD, ID_POD), IPCacheEntry(PEER, ID_PEER)])
    h.dp.set_policy(EP, [PolicyEntry("ingress", identity=ID_PEER, protocol=6, port=80),
                         PolicyEntry("ingress", identity=0, protocol=6, port=22, deny=True)])
    h.dp.set_enforcement(EP, ingress=True, egress=False, audit=True)
    assert h.dp.list_endpoints()[0].policy_audit

    assert h.ingress(pk.tcp(PEER, 40001, POD, 8080)) == TC_ACT_OK  # default deny, audited
    (v,) = _verdicts(h)
    assert (v.verdict, v.drop_reason, v.dst_port) == (AUDIT, drop.DROP_POLICY, 8080)
    assert h.ingress(pk.tcp(PEER, 40002, POD, 22)) == TC_ACT_OK  # an explicit deny is audited too
    (v,) = _verdicts(h)
    assert (v.verdict, v.drop_reason) == (AUDIT, drop.DROP_POLICY_DENY)
    assert h.ingress(pk.tcp(PEER, 40003, POD, 80)) == TC_ACT_OK  # allowed stays FORWARDED
    (v,) = _verdicts(h)
    assert v.verdict == FORWARDED
    assert h.metric(drop.DROP_POLICY, 1) == 0

    h.dp.set_enforcement(EP, ingress=True, egress=False, audit=False)
    assert h.ingress(pk.tcp(PEER, 40004, POD, 8080)) == TC_ACT_SHOT
    assert [v.verdict for v in _verdicts(h)] == [DROPPED]


def test_audit_keeps_an_endpoint_without_policy_map_closed(harness):
    """Fail closed beats audit: no policy map yet = dropped (DROP_NO_CONFIG), as before."""
    h = harness
    h.endpoint(EP, POD, ID_POD, ingress=True)
    h.dp.set_enforcement(EP, ingress=True, egress=False, audit=True)
    h.dp.remove_policy_map(EP)
    assert h.ingress(pk.tcp(PEER, 40005, POD, 8080)) == TC_ACT_SHOT
