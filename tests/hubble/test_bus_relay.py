"""Observers on a real nats-server: historic queries merged across nodes, follow without holes or
duplicates (gaps reported as lost events), the relay's HTTP API and `propolis observe` on both paths."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp
import orjson
import pytest
from hubble_helpers import make_enricher, make_event

from propolis.bus.messages import FlowQuery
from propolis.hubble.client import BusFlowSource
from propolis.hubble.observer import LOST_SUBSCRIBER, Observer
from propolis.hubble.relay import start_relay
from propolis.maps import events as ev

T0 = time.monotonic()


def at(offset_s: float, **kw):
    return make_event(timestamp_ns=int((T0 + offset_s) * 1e9), **kw)


@pytest.fixture
async def observers(bus):
    obs = {n: Observer(n, instance=f"{n}-i", enricher=make_enricher(), capacity=4, publish=bus.publish_raw)
           for n in ("n1", "n2")}
    subs = [await o.serve_queries(bus) for o in obs.values()]
    # n1: t=1,3,5 ; n2: t=2,4 (drop at 4)
    for i, (node, extra) in enumerate([("n1", {}), ("n2", {}), ("n1", {}),
                                       ("n2", dict(type=ev.CILIUM_NOTIFY_DROP, verdict=2, drop_reason=133)),
                                       ("n1", {})], start=1):
        await obs[node].handle(at(i, dst_port=8000 + i, **extra))
    await bus.flush()
    yield obs
    for s in subs:
        await s.unsubscribe()


async def test_historic_merges_nodes_by_time(bus, observers):
    src = BusFlowSource(bus, timeout=2.0, quiet=0.3)
    flows, done = await src.historic(FlowQuery(number=3))
    assert [r["flow"]["l4"]["TCP"]["destination_port"] for r in flows] == [8003, 8004, 8005]
    assert sorted(done) == ["n1", "n2"] and src.last_status["seen_flows"] == 5
    flows, _ = await src.historic(FlowQuery(number=2, first=True))
    assert [r["node_name"] for r in flows] == ["n1", "n2"]
    flows, _ = await src.historic(FlowQuery(whitelist=[{"verdict": ["DROPPED"]}]))
    assert [r["flow"]["drop_reason_desc"] for r in flows] == ["POLICY_DENIED"]
    flows, done = await src.historic(FlowQuery(nodes=["n2"]))
    assert {r["node_name"] for r in flows} == {"n2"} and list(done) == ["n2"]


async def test_follow_continues_after_history_and_reports_gaps(bus, observers):
    got: list[dict] = []
    src = BusFlowSource(bus, timeout=2.0, quiet=0.3)

    async def consume():
        async for r in src.stream(FlowQuery(number=1, whitelist=[{"source_pod": ["shop/"]}]), follow=True):
            got.append(r)

    task = asyncio.create_task(consume())
    try:
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.05)
        await observers["n1"].handle(at(6, dst_port=8006))
        observers["n1"].seq += 3  # three flows published that this subscriber never sees
        await observers["n1"].handle(at(7, dst_port=8007))
        await observers["n2"].handle(at(8, dst_port=8008, src_ip="1.1.1.1", src_identity=2))  # filtered out
        for _ in range(50):
            if len(got) >= 4:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ports = [r["flow"]["l4"]["TCP"]["destination_port"] if "flow" in r else r["lost_events"]["num_events_lost"]
             for r in got]
    assert ports == [8005, 8006, 3, 8007]
    assert got[2]["lost_events"]["source"] == LOST_SUBSCRIBER and got[2]["node_name"] == "n1"


async def test_relay_api_and_observe_cli(bus, observers, nats_server):
    relay, runner, url, task = await start_relay(bus, port=0, timeout=2.0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/api/v1/flows", json={"number": 2}) as resp:
                lines = [orjson.loads(x) for x in (await resp.read()).splitlines()]
            assert [r["flow"]["l4"]["TCP"]["destination_port"] for r in lines] == [8004, 8005]
            async with http.get(f"{url}/api/v1/flows", params={"whitelist": '[{"verdict":["DROPPED"]}]',
                                                               "number": "10"}) as resp:
                assert len((await resp.read()).splitlines()) == 1
            async with http.post(f"{url}/api/v1/flows", json={"whitelist": [{"bogus": 1}]}) as resp:
                assert resp.status == 400
            status = await (await http.get(f"{url}/api/v1/status")).json()
            assert status["num_connected_nodes"] == 2 and status["num_flows"] == 5 and status["max_flows"] == 8
            async with http.post(f"{url}/api/v1/flows", json={"follow": True}) as resp:
                await observers["n2"].handle(at(9, dst_port=8009))
                line = await asyncio.wait_for(resp.content.readline(), 5)
                assert orjson.loads(line)["flow"]["l4"]["TCP"]["destination_port"] == 8009
            for _ in range(40):
                smap = await (await http.get(f"{url}/api/v1/servicemap")).json()
                if smap["edges"]:
                    break
                await asyncio.sleep(0.05)
            assert {n["id"] for n in smap["nodes"]} == {"shop/frontend", "shop/backend"}
            assert (await (await http.get(f"{url}/healthz")).json())["status"] == "alive"
            page = await (await http.get(f"{url}/")).text()
            assert "<svg" in page and "/api/v1/servicemap" in page

        env = {**os.environ, "PROPOLIS_NATS_URL": nats_server.url}
        for server in (url, "nats"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "propolis.cli.main", "observe", "--server", server, "-o", "json",
                "--to-port", "8003", "--to-port", "8004", "--not", "--verdict", "DROPPED",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err.decode()
            assert [orjson.loads(x)["l4"]["TCP"]["destination_port"] for x in out.splitlines()] == [8003], server
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "propolis.cli.main", "hubble", "status", "--server", server, "-o", "json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            st = orjson.loads(out)
            assert proc.returncode == 0 and st["num_connected_nodes"] == 2 and st["max_flows"] == 8, err
            assert [(n["name"], n["num_flows"]) for n in st["nodes"]] == [("n1", 3), ("n2", 3)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "propolis.cli.main", "hubble", "nodes", "--server", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert out.decode().split() == ["NAME", "STATUS", "FLOWS", "SEEN", "n1", "Connected", "3/4", "3",
                                        "n2", "Connected", "3/4", "3"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
