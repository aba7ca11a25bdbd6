"""The rules of `propolis status` on real heartbeat messages: stale detection, restarts, missing
services, feature reasons, and the exit code of the command against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import pytest

from propolis.bus import codec, subjects
from propolis.bus.messages import Heartbeat
from propolis.cli.main import build_parser
from propolis.runtime.service import Runtime
from propolis.runtime.settings import CommonSettings
from propolis.status import build_report
from propolis.suite import SUITE_SERVICES

NOW = 1_800_000_000.0
NODES = ("s-worker", "s-worker2")
#: what this machine's kernel says (docs: no sch_fq, no kernel WireGuard, wireguard-go installed)
KERNEL = {
    "sch_fq": {"available": False, "detail": "sch_fq missing (Error: Specified qdisc kind is unknown.)"},
    "wireguard": {"available": False, "detail": "no kernel WireGuard (Error: Unknown device type.)"},
    "wireguard-go": {"available": True, "detail": "userspace WireGuard available"},
    "xfrm-esp": {"available": True, "detail": "ESP states (IPsec) available"},
    "clsact": {"available": True, "detail": "tc clsact available"},
    "bpffs": {"available": True, "detail": "mounted at /sys/fs/bpf"},
}
DATAPATH_FEATURES = {"Policy enforcement": {"state": "Default", "detail": "L3/L4 in eBPF on every pod veth"},
                     "KubeProxyReplacement": {"state": "True", "detail": "Service load-balancing in eBPF"}}


def beat(service: str, node: str, *, age: float = 0.5, interval: float = 2.0, health: str = "ok",
         components: dict | None = None, features: dict | None = None, instance: str = "",
         now: float = NOW) -> Heartbeat:
    """A heartbeat as status reads it from KV: encoded and decoded by the bus codec."""
    hb = Heartbeat(service=service, node=node, instance=instance or f"{service}-{node}"[-30:], version="0.1.0",
                   pid=4242, started_at=now - 300, sent_at=now - age, health=health,
                   components=components or {"bus": {"state": "ok", "reason": ""}},
                   features=features or {}, interval=interval)
    return codec.decode(codec.encode(hb), Heartbeat)


def suite_beats(now: float = NOW, **overrides: Heartbeat) -> list[Heartbeat]:
    """A fresh heartbeat from every instance of the suite list on NODES, plus the sandbox's kubelets."""
    beats = {("kubelet", n): beat("kubelet", n, now=now) for n in NODES}
    for spec in SUITE_SERVICES:
        if spec.enabled_by:  # optional services (wireguard-keymgr) run only when their option is on
            continue
        for node in NODES if spec.scope == "node" else ("s-control-plane",):
            features = DATAPATH_FEATURES if spec.name == "datapath-writer" else None
            beats[(spec.name, node)] = beat(spec.name, node, features=features, now=now)
    beats.update({(hb.service, hb.node): hb for hb in overrides.values()})
    return list(beats.values())


def row(rep, service: str, node: str) -> dict:
    return next(r for r in rep.services if r["service"] == service and r["node"] == node)


def test_fresh_heartbeats_of_the_whole_suite_are_healthy():
    rep = build_report(suite_beats(), now=NOW, nodes=NODES, kernel=KERNEL)
    assert rep.healthy, rep.problems
    assert {(r["service"], r["health"]) for r in rep.services} >= {("datapath-writer", "ok"), ("kubelet", "ok")}
    assert row(rep, "datapath-writer", "s-worker2")["uptime_s"] == 300
    assert rep.kubernetes["state"] == "OK" and rep.kubernetes["nodes"] == list(NODES)
    assert rep.features["KubeProxyReplacement"] == {"source": "datapath-writer", **DATAPATH_FEATURES[
        "KubeProxyReplacement"]}


@pytest.mark.parametrize("interval, age, health", [(2.0, 5.9, "ok"), (2.0, 6.1, "unhealthy"),
                                                   (0.5, 1.6, "unhealthy"), (10.0, 25.0, "ok")])
def test_an_instance_is_stale_after_three_of_its_own_intervals(interval, age, health):
    late = beat("datapath-writer", "s-worker", age=age, interval=interval, features=DATAPATH_FEATURES)
    rep = build_report(suite_beats(x=late), now=NOW, nodes=NODES, kernel=KERNEL)
    assert row(rep, "datapath-writer", "s-worker")["health"] == health
    assert rep.healthy is (health == "ok")
    if health == "unhealthy":
        assert row(rep, "datapath-writer", "s-worker")["reasons"] == [
            f"no heartbeat for {age:.0f}s, timeout {3 * interval:.0f}s"]
        assert any(p.startswith("datapath-writer on s-worker: unhealthy") for p in rep.problems)


def test_a_heartbeat_of_schema_1_0_is_judged_with_the_default_interval():
    hb = beat("identity-allocator", "s-control-plane", age=7.0)
    fields = [getattr(hb, f) for f in Heartbeat._FIELDS if f != "interval"]
    old = codec.decode(msgpack.packb(["heartbeat", 1, 0, *fields]), Heartbeat)
    assert old.interval == 0.0
    rep = build_report(suite_beats(x=old), now=NOW, nodes=NODES)
    assert row(rep, "identity-allocator", "s-control-plane")["stale_after_s"] == 6.0
    assert not rep.healthy


def test_a_runtime_heartbeat_carries_its_interval():
    rt = Runtime("datapath-writer", CommonSettings(node_name="s-worker", heartbeat_interval=0.25), [])
    assert codec.decode(codec.encode(rt.heartbeat()), Heartbeat).interval == 0.25


def test_a_restarted_instance_replaces_its_stale_predecessor():
    old = beat("k8s-watcher", "s-control-plane", age=20.0, instance="old00000")
    rep = build_report([old, *suite_beats()], now=NOW, nodes=NODES, kernel=KERNEL)
    olds = [r for r in rep.services if r["instance"] == "old00000"]
    assert olds[0]["health"] == "replaced" and "replaced by instance" in olds[0]["reasons"][0]
    assert rep.healthy, rep.problems


def test_missing_instances_are_unhealthy():
    beats = [hb for hb in suite_beats() if (hb.service, hb.node) != ("datapath-writer", "s-worker2")]
    rep = build_report(beats, now=NOW, nodes=NODES)
    assert row(rep, "datapath-writer", "s-worker2") == {"service": "datapath-writer", "node": "s-worker2",
                                                        "health": "missing", "reasons": ["not running"]}
    assert "datapath-writer on s-worker2: missing (not running)" in rep.problems

    rep = build_report([], now=NOW)
    assert {r["service"] for r in rep.services} == {s.name for s in SUITE_SERVICES
                                                    if s.scope == "cluster" and not s.enabled_by}
    assert rep.kubernetes == {"nodes": [], "watchers": 0, "state": "Unavailable",
                              "reason": "k8s-watcher not running", "resource_version": ""}


def test_a_degraded_k8s_watcher_is_the_kubernetes_connection_state():
    watcher = beat("k8s-watcher", "s-control-plane", health="degraded",
                   components={"mirror": {"state": "degraded", "reason": "pods: connection refused"}})
    rep = build_report(suite_beats(x=watcher), now=NOW, nodes=NODES)
    assert rep.kubernetes["state"] == "Degraded" and rep.kubernetes["reason"] == "mirror: pods: connection refused"
    assert not rep.healthy


def test_every_feature_is_listed_with_the_reason_when_off():
    rep = build_report(suite_beats(), now=NOW, nodes=NODES, kernel=KERNEL)
    f = rep.features
    assert list(f)[:7] == ["KubeProxyReplacement", "Policy enforcement", "Hubble", "Encryption",
                           "BandwidthManager", "Host firewall", "Cluster Mesh"]
    if "hubble" not in {s.name for s in SUITE_SERVICES}:
        assert f["Hubble"] == {"state": "Disabled", "reason": "hubble not running"}
    assert f["Encryption"]["state"] == "Disabled"
    assert f["Encryption"]["reason"] == ("wireguard-keymgr not running; no kernel WireGuard (Error: Unknown device "
                                         "type.): WireGuard would run in userspace (wireguard-go); "
                                         "IPsec possible (XFRM ESP)")
    assert f["BandwidthManager"]["state"] == "Disabled"
    assert f["BandwidthManager"]["reason"].startswith("not implemented by datapath-writer yet; sch_fq missing")
    assert f["Cluster Mesh"] == {"state": "Disabled", "reason": "clustermesh-apiserver not running"}
    assert f["Socket LB"]["state"] == "Disabled" and "datapath-writer" in f["Socket LB"]["reason"]


def test_features_come_only_from_live_instances_and_are_checked_against_the_kernel():
    hubble = beat("hubble", "s-worker", features={"Hubble": {"state": "Ok", "detail": "12 flows/s"}})
    claims = beat("datapath-writer", "s-worker", features=DATAPATH_FEATURES)
    no_clsact = {**KERNEL, "clsact": {"available": False, "detail": "no clsact (Error: unknown qdisc)"}}
    rep = build_report(suite_beats(h=hubble, c=claims), now=NOW, nodes=NODES, kernel=no_clsact)
    assert rep.features["Hubble"] == {"source": "hubble", "state": "Ok", "detail": "12 flows/s"}
    assert rep.features["KubeProxyReplacement"]["reason"] == "kernel lacks no clsact (Error: unknown qdisc)"
    assert any(p.startswith("KubeProxyReplacement: kernel lacks") for p in rep.problems)

    dead = [beat("datapath-writer", n, age=60, features=DATAPATH_FEATURES) for n in NODES]
    rep = build_report(dead, now=NOW, nodes=NODES)
    assert rep.features["KubeProxyReplacement"] == {"state": "Disabled", "reason": "datapath-writer not running"}


async def run_status(url: str, *flags: str, capsys) -> tuple[int, dict]:
    args = build_parser().parse_args(["--nats-url", url, "status", "-o", "json", *flags])
    code = await args.func(args)
    return code, json.loads(capsys.readouterr().out)


async def test_exit_code_and_json_against_a_real_bus(bus, nats_server, capsys):
    kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
    now = time.time()
    for hb in suite_beats(now=now):
        await kv.put(subjects.heartbeat_key(hb.service, hb.node, hb.instance), hb)
    code, doc = await run_status(nats_server.url, capsys=capsys)
    assert code == 0, doc["problems"]
    assert doc["nats"]["jetstream"]["state"] == "OK" and doc["healthy"] is True
    assert {(s["service"], s["node"]) for s in doc["services"]} >= {("datapath-writer", n) for n in NODES}

    code, doc = await run_status(nats_server.url, "--stale-after", "0.001", capsys=capsys)
    assert code == 1 and all(s["health"] == "unhealthy" for s in doc["services"])


async def test_wait_blocks_until_the_missing_service_heartbeats(bus, nats_server, capsys):
    kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
    beats = suite_beats(now=time.time())
    late = next(hb for hb in beats if hb.service == "datapath-writer")
    for hb in beats:
        if hb is not late:
            await kv.put(subjects.heartbeat_key(hb.service, hb.node, hb.instance), hb)
    waiting = asyncio.create_task(run_status(nats_server.url, "--wait", "--wait-duration", "20", capsys=capsys))
    await asyncio.sleep(1.5)
    assert not waiting.done()
    late.sent_at = time.time()
    await kv.put(subjects.heartbeat_key(late.service, late.node, late.instance), late)
    code, doc = await asyncio.wait_for(waiting, 10)
    assert code == 0 and doc["healthy"]


def test_without_kernel_probes_no_kernel_reason_is_guessed():
    not_root = {"probes": {"available": False, "detail": "not root: kernel features not probed"}}
    rep = build_report(suite_beats(), now=NOW, nodes=NODES, kernel=not_root)
    assert rep.features["BandwidthManager"] == {"state": "Disabled", "reason": "not implemented by datapath-writer yet"}
    assert rep.features["Encryption"] == {"state": "Disabled", "reason": "wireguard-keymgr not running"}


def test_bandwidth_manager_shows_its_mode_and_why_and_tbf_without_sch_fq_is_no_problem():
    mode = {"state": "tbf", "detail": "tbf per pod: egress on its eth0, ingress on its lxc veth (no EDT: sch_fq missing)"}
    writer = beat("datapath-writer", "s-worker", features={**DATAPATH_FEATURES, "BandwidthManager": mode})
    rep = build_report(suite_beats(c=writer), now=NOW, nodes=NODES, kernel=KERNEL)
    assert rep.features["BandwidthManager"] == {"source": "datapath-writer", **mode}
    assert not [p for p in rep.problems if p.startswith("BandwidthManager")]
