"""A heartbeat with wrong field types (or truncated) in the real heartbeats bucket: `propolis status`
reports that instance as malformed and exits 1, text and JSON, instead of a traceback."""

from __future__ import annotations

import time

import msgpack
from test_status import NODES, NOW, run_status, suite_beats

from propolis.bus import subjects
from propolis.status import build_report

#: the datapath-writer of node 1, with `components` a string and `pid` a string
BAD_KEY = subjects.heartbeat_key("datapath-writer", NODES[0], "bad1")
BAD = msgpack.packb(["heartbeat", 1, 1, "datapath-writer", NODES[0], "bad1", "v", "4242", 0.0, 0.0, "ok", "all good"])


def test_a_malformed_heartbeat_is_its_instance_reported_malformed():
    beats = [hb for hb in suite_beats() if not (hb.service == "datapath-writer" and hb.node == NODES[0])]
    rep = build_report(beats, now=NOW, nodes=NODES, malformed={BAD_KEY: "heartbeat field 'pid': expected int"})
    rows = [r for r in rep.services if r["service"] == "datapath-writer" and r["node"] == NODES[0]]
    assert [(r["health"], r["instance"]) for r in rows] == [("malformed", "bad1")]  # not also "missing"
    assert not rep.healthy and any("malformed" in p and "'pid'" in p for p in rep.problems)


async def test_status_survives_a_malformed_heartbeat_on_the_bus(bus, nats_server, capsys):
    kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
    for hb in suite_beats(now=time.time()):
        await kv.put(subjects.heartbeat_key(hb.service, hb.node, hb.instance), hb)
    await kv.store.put(BAD_KEY, BAD)
    code, doc = await run_status(nats_server.url, capsys=capsys)
    assert code == 1
    bad = next(s for s in doc["services"] if s.get("instance") == "bad1")
    assert bad["health"] == "malformed" and "'pid': expected int, got str" in bad["reasons"][0]
    args_text = await run_text(nats_server.url, capsys)
    assert "malformed (heartbeat unreadable" in args_text


async def run_text(url: str, capsys) -> str:
    from propolis.cli.main import build_parser
    args = build_parser().parse_args(["--nats-url", url, "status"])
    assert await args.func(args) == 1
    return capsys.readouterr().out
