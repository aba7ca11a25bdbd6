"""Observer: ring buffer order and eviction, queries, publishing, lost-event accounting."""

from __future__ import annotations

import pytest
from hubble_helpers import make_enricher, make_event

from propolis.bus import codec
from propolis.bus.messages import FlowMessage, FlowQuery, LostEvents
from propolis.hubble.filters import FlowMatcher
from propolis.hubble.observer import LOST_PERF_RING, FlowRing, Observer
from propolis.maps import events as ev


def test_ring_keeps_last_n_and_evicts_oldest_first():
    ring = FlowRing(4)
    for i in range(1, 7):
        ring.append(i, {"time": f"t{i:02d}", "n": i})
    assert len(ring) == 4 and ring.seen == 6 and ring.oldest_seq() == 3
    assert [s for s, _ in ring.snapshot()] == [3, 4, 5, 6]
    everything = FlowMatcher()
    assert [s for s, _ in ring.query(everything, number=2)] == [5, 6]
    assert [s for s, _ in ring.query(everything, number=2, first=True)] == [3, 4]
    assert [s for s, _ in ring.query(everything, since="t04", until="t05")] == [4, 5]
    assert [s for s, _ in ring.query(FlowMatcher([{"uuid": ["x"]}]))] == []
    with pytest.raises(ValueError):
        FlowRing(0)


class Sink:
    def __init__(self):
        self.flows = []

    def process(self, flow):
        self.flows.append(flow)


async def test_observer_numbers_publishes_and_feeds_sinks():
    sent = []

    async def publish(subject, data):
        sent.append((subject, codec.decode(data)))

    sink = Sink()
    obs = Observer("n1", instance="i1", enricher=make_enricher(), capacity=3, sinks=[sink], publish=publish)
    await obs.handle(make_event())
    await obs.handle(make_event(type=ev.CILIUM_NOTIFY_DROP, verdict=2, drop_reason=133, subtype=133,
                                src_ip="1.1.1.1", src_identity=2))
    assert [s for s, _ in sent] == ["propolis.v1.flows.n1.FORWARDED.shop.shop", "propolis.v1.flows.n1.DROPPED._.shop"]
    msg = sent[0][1]
    assert isinstance(msg, FlowMessage) and (msg.node, msg.instance, msg.seq) == ("n1", "i1", 1)
    assert len(sink.flows) == 2 and obs.ring.seen == 2

    lost_seen = []
    obs.on_lost.append(lambda src, n: lost_seen.append((src, n)))
    assert await obs.datapath_lost(100) == 0  # baseline: losses before this observer are not ours
    assert await obs.datapath_lost(107) == 7
    assert await obs.datapath_lost(107) == 0
    assert obs.lost == {LOST_PERF_RING: 7} and lost_seen == [(LOST_PERF_RING, 7)]
    subject, notice = sent[-1]
    assert subject == "propolis.v1.flows.n1.lost" and isinstance(notice, LostEvents) and notice.num_events_lost == 7


async def test_answer_comes_in_chunks_with_status():
    obs = Observer("n1", instance="i1", capacity=1500)
    for _ in range(1200):
        await obs.handle(make_event())
    batches = list(obs.answer(FlowQuery(number=1100)))
    assert [len(b.flows) for b in batches] == [200] * 5 + [100, 0] and batches[-1].done
    assert batches[0].flows[0][0] == 101 and batches[5].flows[-1][0] == 1200
    assert (batches[-1].num_flows, batches[-1].max_flows, batches[-1].last_seq) == (1200, 1500, 1200)
    only = list(obs.answer(FlowQuery(whitelist=[{"verdict": ["DROPPED"]}])))
    assert len(only) == 1 and only[0].done and not only[0].flows
