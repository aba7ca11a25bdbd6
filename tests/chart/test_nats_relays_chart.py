"""The chart's relay tier (nats.relays): off by default; when on, relays with the relay users and the KV write
mapping of `bus/relay.py`, the per-node services pointed at the relay Service, and the rendered hub and relay
configurations run for real: a relay mirrors the buckets, a node service's write through it lands in the hub,
and another service's slice stays closed to it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_render import tool
from test_nats_chart import free_port, nats_objects, write_server

from propolis import suite
from propolis.bus import permissions, relay, subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Watermark
from propolis.errors import TemporaryError

RELAYS = "nats.relays.enabled=true"


def objects(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def nats_url_env(workload: dict[str, Any]) -> str:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return next(e["value"] for e in container["env"] if e["name"] == "PROPOLIS_NATS_URL")


def test_no_relays_by_default() -> None:
    conf, secret, docs = nats_objects()
    assert not [d for d in docs if "nats-relay" in d["metadata"]["name"]]
    assert "leafnodes" not in conf and "domain" not in conf and "relay-auth.conf" not in secret
    assert nats_url_env(objects(docs, "DaemonSet", "propolis-datapath-writer")) == \
        "nats://$(PROPOLIS_NATS_SERVICE_HOST):4222"


def test_relays_render_the_relay_users_and_point_node_services_at_them() -> None:
    conf, secret, docs = nats_objects(RELAYS, "nats.relays.replicas=2")
    deployment = objects(docs, "Deployment", "propolis-nats-relay")
    assert deployment["spec"]["replicas"] == 2
    mirrors = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mirrors")
    ready_file = mirrors["command"][mirrors["command"].index("--ready-file") + 1]
    assert mirrors["readinessProbe"]["exec"]["command"] == ["test", "-f", ready_file]  # clients only once caught up
    assert f"domain: {relay.HUB_DOMAIN}" in conf and "leafnodes {" in conf
    relay_conf = objects(docs, "ConfigMap", "propolis-nats-relay")["data"]["nats.conf"]
    assert "mappings " + json.dumps({"$KV.>": f"{relay.KV_WRITE_PREFIX}$KV.>"}) in relay_conf

    admin = permissions.Credentials("admin", secret["password-admin"])
    users = {s.name: permissions.Credentials(s.name, secret[f"password-{s.name}"]) for s in suite.SUITE_SERVICES}
    expected = permissions.server_config(users, admin=admin, kv_prefix=relay.KV_WRITE_PREFIX)
    assert json.loads(secret["relay-auth.conf"].removeprefix("authorization ")) == \
        json.loads(expected.removeprefix("authorization "))

    urls = {(d["kind"], d["metadata"]["name"]): nats_url_env(d) for d in docs
            if d["kind"] in ("DaemonSet", "Deployment") and d["metadata"]["name"] != "propolis-nats-relay"}
    assert {("DaemonSet", "propolis-datapath-writer"), ("Deployment", "propolis-k8s-watcher")} <= set(urls)
    for (kind, name), url in urls.items():
        assert url == ("nats://$(PROPOLIS_NATS_RELAY_SERVICE_HOST):4223" if kind == "DaemonSet"
                       else "nats://$(PROPOLIS_NATS_SERVICE_HOST):4222"), name


@pytest.fixture
def rendered_hub_and_relay(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The chart's hub (replicas 1) and one relay, from the rendered configurations, on loopback ports."""
    conf, secret, docs = nats_objects("nats.replicas=1", RELAYS)
    leafnode, hub_client, relay_client = free_port(), free_port(), free_port()
    hub_path = write_server(tmp_path / "hub", conf.replace("port: 7422", f"port: {leafnode}"), secret,
                            client=hub_client, monitor=free_port())
    (tmp_path / "hub" / "auth" / "leafnodes.conf").write_text(secret["leafnodes.conf"])
    relay_conf = objects(docs, "ConfigMap", "propolis-nats-relay")["data"]["nats.conf"]
    relay_path = write_server(tmp_path / "relay", relay_conf.replace("port: 4223", "port: 4222")
                              .replace("http_port: 8223", "http_port: 8222"),
                              {"auth.conf": secret["relay-auth.conf"]}, client=relay_client, monitor=free_port())
    relay_env = {"POD_NAME": "propolis-nats-relay-0", "RELAY_DOMAIN": "relay-propolis-nats-relay-0",
                 "HUB_LEAFNODE_URL": f"nats-leaf://relay:{secret['password-relay']}@127.0.0.1:{leafnode}"}
    procs = []
    try:
        for path, env, log in ((hub_path, {"POD_NAME": "propolis-nats-0"}, "hub.log"),
                               (relay_path, relay_env, "relay.log")):
            with open(tmp_path / log, "w") as logf:
                procs.append(subprocess.Popen([tool("nats-server"), "-c", str(path)], env=env,
                                              stdout=subprocess.DEVNULL, stderr=logf))
        yield f"nats://127.0.0.1:{hub_client}", f"nats://127.0.0.1:{relay_client}", secret
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


async def _connect(url: str, user: str, secret: dict[str, str]) -> Bus:
    bus = Bus(url, name=f"test-{user}", user=user, password=secret[f"password-{user}"])
    await bus.connect(max_wait=10)
    return bus


async def _until(check: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except TemporaryError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.1)


async def test_the_rendered_relay_mirrors_the_hub_and_carries_node_writes(rendered_hub_and_relay) -> None:
    hub_url, relay_url, secret = rendered_hub_and_relay
    buses = [await _connect(hub_url, "admin", secret), await _connect(relay_url, "admin", secret),
             await _connect(hub_url, "k8s-watcher", secret), await _connect(relay_url, "datapath-writer", secret)]
    hub_admin, relay_admin, watcher, writer = buses
    try:
        await hub_admin.ensure_buckets()  # the bootstrap Job
        await _until(lambda: _mirrors(relay_admin), "the relay's mirrors (what relay-mirrors does)")

        k8s = await watcher.kv(subjects.K8S_BUCKET)
        await k8s.put("pods.ns.a", Watermark(1, 0.0))
        relay_k8s = await writer.kv(subjects.K8S_BUCKET)
        got = await _until(lambda: relay_k8s.get("pods.ns.a"), "the hub's write on the relay")
        assert got.value == Watermark(1, 0.0)

        ipcache_key = subjects.ipcache_key("node-1", "10.0.0.1")
        await (await writer.kv(subjects.IPCACHE_BUCKET)).put(ipcache_key, Watermark(2, 0.0))
        at_hub = await (await hub_admin.kv(subjects.IPCACHE_BUCKET)).get(ipcache_key)
        assert at_hub is not None and at_hub.value == Watermark(2, 0.0)
        with pytest.raises(Exception, match="[Tt]imeout"):  # the k8s-watcher's slice is not the writer's
            await writer.nc.request(f"$KV.{subjects.K8S_BUCKET}.pods.ns.a", b"{}", timeout=0.5)
        assert any("permissions violation" in e for e in writer.errors)
    finally:
        for bus in buses:
            await bus.close()


async def _mirrors(bus: Bus) -> bool:
    await relay.ensure_mirrors(bus)
    return True
