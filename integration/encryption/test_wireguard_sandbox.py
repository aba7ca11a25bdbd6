"""WireGuard transparent encryption in a sandbox (`sandbox up --encryption wireguard`), with real packets.

One sandbox for the module (watcher, identity allocator, datapath-writer, wireguard-keymgr on 2 nodes), pods
a and c on node 1, b on node 2. The underlay is captured with an AF_PACKET socket in the underlay namespace:
a known payload sent pod to pod across nodes must never be seen there in cleartext, only UDP 51871;
same-node traffic never enters the tunnel; policy still applies to decrypted traffic; a keymgr restart
under a TCP stream resets nothing; bad keys on a Node are refused naming the node while the others work.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from wg_helpers import (
    WG_PORT,
    Capture,
    admin_bus,
    can_connect,
    connect_with_retry,
    keymgr_progress,
    keymgr_state_dir,
    pod_ip,
    service_pid,
)

from propolis.bus import subjects
from propolis.bus.messages import Event, WireguardNodeKey
from propolis.encryption import keys
from propolis.encryption.backend import DEVICE
from propolis.encryption.uapi import UapiClient, set_device_request
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.netns import iproute_in

pytestmark = pytest.mark.root

NS = "wg"
SERVICES = "k8s-watcher,identity-allocator,datapath-writer,wireguard-keymgr"


def pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "echo", "image": "echo",
                                                       "ports": [{"containerPort": 8080}]}]}}


def write(tmp_path, docs: list[dict]) -> str:
    path = tmp_path / f"m-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with running_sandbox(nodes=2, services=SERVICES, encryption="wireguard") as state:
        cfg = state.sandbox()
        n1, n2 = cfg.node_names()
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                pod("a", n1, "a"), pod("c", n1, "c"), pod("b", n2, "b")]
        asyncio.run(cluster.apply(state, [write(tmp_path_factory.mktemp("wg"), docs)]))
        asyncio.run(cluster.wait_running(state, 3, namespace=NS))
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


@pytest.fixture(scope="module")
def ips(sandbox):
    async def get():
        return {p: await pod_ip(sandbox, f"{NS}/{p}") for p in ("a", "b", "c")}
    return asyncio.run(get())


async def test_keys_published_on_bus_and_node_private_key_stays_on_the_node(sandbox):
    cfg = sandbox.sandbox()
    bus = admin_bus(sandbox, "wg-test-keys")
    await bus.connect(max_wait=5)
    try:
        published = {e.key: e.value for e in (await (await bus.kv(subjects.WIREGUARD_BUCKET)).items()).values()}
        for node in cfg.node_names():
            key_file = keymgr_state_dir(sandbox, node) / f"{DEVICE}.key"
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
            private = key_file.read_text().strip()
            value = published[node]
            assert isinstance(value, WireguardNodeKey) and value.node == node and value.listen_port == WG_PORT
            assert value.public_key == keys.public_key(private)
            assert private not in repr(published)
            device = await UapiClient(keymgr_state_dir(sandbox, node) / "sock" / f"{DEVICE}.sock").get()
            assert device.private_key == private and device.listen_port == WG_PORT
            node_obj = await cluster.get(sandbox, "nodes", node)
            assert node_obj["metadata"]["annotations"]["network.cilium.io/wg-pub-key"] == value.public_key
    finally:
        await bus.close()


async def test_cross_node_traffic_is_only_udp_51871_on_the_underlay(sandbox, ips):
    cfg = sandbox.sandbox()
    secret = f"propolis-secret-{uuid.uuid4().hex}".encode()
    local = f"propolis-local-{uuid.uuid4().hex}".encode()
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])
    same = await connect_with_retry(sandbox, f"{NS}/a", ips["c"])
    try:
        with Capture(cfg.underlay_netns) as cap:
            for i in range(20):
                assert await stream.echo(secret + b" %d" % i) == f"{NS}/b ".encode() + secret + b" %d" % i
                assert await same.echo(local) == f"{NS}/c ".encode() + local
            await asyncio.sleep(0.2)
        assert not cap.contains(secret), "cross-node payload seen in cleartext on the underlay"
        assert not cap.contains(local), "same-node payload left the node"
        assert cap.count(17, WG_PORT) >= 40, f"expected WireGuard UDP {WG_PORT}, saw {cap.count(17, WG_PORT)}"
        assert cap.count(6, 8080) == 0, "pod TCP seen unencapsulated on the underlay"
    finally:
        stream.close()
        same.close()

    def tunnel_routes() -> set[str]:
        with iproute_in(cfg.node_netns(1)) as ipr:  # pyroute2's sync API: off the event loop
            wg_index = ipr.link_lookup(ifname=DEVICE)[0]
            return {f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=2, table=254)
                    if r.get_attr("RTA_OIF") == wg_index}
    assert await asyncio.to_thread(tunnel_routes) == {cfg.pod_cidr(2)}  # node 1's own pods never enter it


async def test_policy_still_applies_to_decrypted_traffic(sandbox, ips, tmp_path):
    await connect_with_retry(sandbox, f"{NS}/b", ips["a"])  # tunnel up both ways before the policy
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "a-from-c-only", "namespace": NS},
              "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}]}}
    path = write(tmp_path, [policy])
    await cluster.apply(sandbox, [path])
    try:
        await cluster.wait(sandbox, timeout=30)
        assert not await can_connect(sandbox, f"{NS}/b", ips["a"]), "b (other node, via WireGuard) reached a"
        assert await can_connect(sandbox, f"{NS}/c", ips["a"])
        assert await can_connect(sandbox, f"{NS}/a", ips["b"])  # a's egress is not restricted
    finally:
        await cluster.delete(sandbox, [path])
        await cluster.wait(sandbox, timeout=30)


async def test_keymgr_restart_under_traffic_resets_nothing(sandbox, ips):
    cfg = sandbox.sandbox()
    node = cfg.node_name(1)
    wg_pid_file = keymgr_state_dir(sandbox, node) / "wireguard-go.pid"
    wg_pid = int(wg_pid_file.read_text())
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])
    bus = admin_bus(sandbox, "wg-test-restart")
    await bus.connect(max_wait=5)
    try:
        old = service_pid(sandbox, "wireguard-keymgr", node)
        os.kill(old, signal.SIGKILL)
        answered, worst = 0, 0.0
        deadline = time.monotonic() + 20
        restarted = False
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            assert await stream.echo(b"during-restart %d" % answered) == f"{NS}/b during-restart {answered}".encode()
            worst = max(worst, time.monotonic() - t0)
            answered += 1
            if not restarted and service_pid(sandbox, "wireguard-keymgr", node) != old:
                progress = await keymgr_progress(bus, node)
                restarted = progress.get("adopted") is True and progress.get("peers") == 1
            if restarted and answered > 40:
                break
            await asyncio.sleep(0.05)
        assert restarted, "keymgr did not come back adopting the running wireguard-go"
        assert int(wg_pid_file.read_text()) == wg_pid
        os.kill(wg_pid, 0)  # the device process outlived the keymgr
        print(f"\nkeymgr restart under a TCP stream: {answered} echoes, slowest {worst * 1000:.0f} ms, no reset")
        assert worst < 1.0, f"an echo took {worst:.2f}s during the restart"
    finally:
        stream.close()
        await bus.close()


async def test_bad_node_keys_are_refused_by_name_and_peers_follow_nodes(sandbox, ips, tmp_path):
    cfg = sandbox.sandbox()
    fake = f"{cfg.name}-worker99"
    fake_node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": fake},
                 "spec": {"podCIDR": cfg.pod_cidr(99)},
                 "status": {"addresses": [{"type": "InternalIP", "address": cfg.node_ip(99)}]}}
    path = write(tmp_path, [fake_node])
    bus = admin_bus(sandbox, "wg-test-bad")
    await bus.connect(max_wait=5)
    kv = await bus.kv(subjects.WIREGUARD_BUCKET)
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])

    async def until(check, what: str, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        while True:
            states = [await keymgr_progress(bus, n) for n in cfg.node_names()]
            if all(check(s) for s in states):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: {states}")
            await asyncio.sleep(0.05)

    async def devices_until(check, what: str, timeout: float = 5.0) -> float:
        """Poll the devices themselves (UAPI): heartbeats come only every 2 s."""
        t0 = time.monotonic()
        while True:
            devs = [await UapiClient(keymgr_state_dir(sandbox, n) / "sock" / f"{DEVICE}.sock").get()
                    for n in cfg.node_names()]
            if all(check(d) for d in devs):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: {devs}")
            await asyncio.sleep(0.02)

    try:
        await cluster.apply(sandbox, [path])
        for bad, reason in ((WireguardNodeKey(fake, "bm90LWEta2V5", WG_PORT), "44 characters"),
                            (WireguardNodeKey(cfg.node_name(1), keys.public_key(keys.generate_private_key()),
                                              WG_PORT), "foreign key")):
            await kv.put(subjects.wireguard_key(fake), bad)
            await until(lambda s: reason in s.get("refused", {}).get(fake, ""),  # noqa: B023 - awaited here
                        f"{fake} refused for {reason}")
            assert await stream.echo(b"still-working") == f"{NS}/b still-working".encode()
        logs = (cfg.log_dir / f"wireguard-keymgr-{cfg.node_name(1)}.log").read_text()
        assert f"node {fake} refused as WireGuard peer" in logs

        good = keys.public_key(keys.generate_private_key())
        await kv.put(subjects.wireguard_key(fake), WireguardNodeKey(fake, good, WG_PORT))
        allowed = [cfg.pod_cidr(99), f"{cfg.node_ip(99)}/32"]
        added = await devices_until(lambda d: good in d.peers and d.peers[good].allowed_ips == allowed,
                                    "peer of the added node")
        await until(lambda s: fake not in s.get("refused", {}), "refusal cleared")
        await cluster.delete(sandbox, [path])
        removed = await devices_until(lambda d: good not in d.peers and len(d.peers) == 1, "peer of the removed node")
        print(f"\nWireGuard peer of an added node on every node after {added * 1000:.0f} ms, removed after "
              f"{removed * 1000:.0f} ms")
        assert added < 1.0 and removed < 1.0, f"peer added after {added:.2f}s, removed after {removed:.2f}s"
        assert await stream.echo(b"after") == f"{NS}/b after".encode()
    finally:
        stream.close()
        await kv.delete(subjects.wireguard_key(fake))
        await cluster.delete(sandbox, [path])
        await bus.close()


async def test_rotate_key_under_a_tcp_stream_no_reset_gap_measured(sandbox, ips):
    cfg = sandbox.sandbox()
    node = cfg.node_name(1)
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])
    bus = admin_bus(sandbox, "wg-test-rotate")
    await bus.connect(max_wait=5)
    try:
        before = (keymgr_state_dir(sandbox, node) / f"{DEVICE}.key").read_text().strip()
        times: list[float] = []
        for i in range(10):  # steady state first
            await stream.echo(b"before %d" % i)
            times.append(time.monotonic())
            await asyncio.sleep(0.02)
        reply = await bus.request(subjects.encryption_rotate_subject(node),
                                  Event("RotateKey", f"Node {node}", "test", "test", node, time.time()), timeout=5)
        rotated_at = time.monotonic()
        assert isinstance(reply, WireguardNodeKey) and reply.public_key != keys.public_key(before)
        while time.monotonic() - rotated_at < 3 or len(times) < 40:
            n = len(times)
            assert await stream.echo(b"rotating %d" % n, timeout=20) == f"{NS}/b rotating {n}".encode()
            times.append(time.monotonic())
            await asyncio.sleep(0.02)
        gap = max(b - a for a, b in zip(times, times[1:]))
        print(f"\nkey rotation under a TCP stream: longest pause {gap * 1000:.0f} ms, no reset")
        after = (keymgr_state_dir(sandbox, node) / f"{DEVICE}.key").read_text().strip()
        assert keys.public_key(after) == reply.public_key
        peer_dev = await UapiClient(keymgr_state_dir(sandbox, cfg.node_name(2)) / "sock" / f"{DEVICE}.sock").get()
        assert list(peer_dev.peers) == [reply.public_key]
        assert gap < 3.0, "the handshake kick should beat WireGuard's 5 s REKEY_TIMEOUT"
    finally:
        stream.close()
        await bus.close()


async def test_a_peer_with_a_wrong_key_fails_closed_never_cleartext(sandbox, ips):
    """Node 2's device takes a key node 1 does not know (as if node 1 held a stale key for it): traffic
    between them stops — encrypted or dropped, never cleartext — and resumes once the keys agree again."""
    cfg = sandbox.sandbox()
    node2 = cfg.node_name(2)
    uapi2 = UapiClient(keymgr_state_dir(sandbox, node2) / "sock" / f"{DEVICE}.sock")
    right = (keymgr_state_dir(sandbox, node2) / f"{DEVICE}.key").read_text().strip()
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])
    marker = f"propolis-wrongkey-{uuid.uuid4().hex}".encode()
    try:
        await uapi2.set(set_device_request(private_key=keys.generate_private_key(), listen_port=WG_PORT),
                        what="wrong key on node 2")
        with Capture(cfg.underlay_netns) as cap:
            with pytest.raises(asyncio.TimeoutError):
                await stream.echo(marker, timeout=2.0)
            assert not await can_connect(sandbox, f"{NS}/c", ips["b"], timeout=1.0)
        assert not cap.contains(marker)
        assert cap.count(6, 8080) == 0 and cap.count(17, WG_PORT) > 0
    finally:
        await uapi2.set(set_device_request(private_key=right, listen_port=WG_PORT), what="right key on node 2")
    try:  # the keys agree again: the same stream resumes (TCP retransmits what was dropped)
        answer = await stream.echo(b"after", timeout=20.0)
        assert answer in (f"{NS}/b ".encode() + marker, f"{NS}/b after".encode())
    finally:
        stream.close()


async def test_an_overwritten_or_deleted_node_key_is_written_back(sandbox):
    cfg = sandbox.sandbox()
    node = cfg.node_name(2)
    right = keys.public_key((keymgr_state_dir(sandbox, node) / f"{DEVICE}.key").read_text().strip())
    bus = admin_bus(sandbox, "wg-test-reassert")
    await bus.connect(max_wait=5)
    kv = await bus.kv(subjects.WIREGUARD_BUCKET)
    try:
        for damage in ("overwrite", "delete"):
            if damage == "overwrite":
                await kv.put(subjects.wireguard_key(node),
                             WireguardNodeKey(node, keys.public_key(keys.generate_private_key()), WG_PORT))
            else:
                await kv.delete(subjects.wireguard_key(node))
            deadline = time.monotonic() + 3
            while True:
                entry = await kv.get(subjects.wireguard_key(node))
                if entry is not None and entry.value.public_key == right:
                    break
                assert time.monotonic() < deadline, f"{damage}: entry of {node} not written back: {entry}"
                await asyncio.sleep(0.05)
        dev1 = await UapiClient(keymgr_state_dir(sandbox, cfg.node_name(1)) / "sock" / f"{DEVICE}.sock").get()
        deadline = time.monotonic() + 3
        while list(dev1.peers) != [right]:
            assert time.monotonic() < deadline, f"node 1 peers {list(dev1.peers)}, want [{right}]"
            await asyncio.sleep(0.05)
            dev1 = await UapiClient(keymgr_state_dir(sandbox, cfg.node_name(1)) / "sock" / f"{DEVICE}.sock").get()
    finally:
        await bus.close()


async def test_a_killed_device_is_recreated_with_its_peers_and_routes(sandbox, ips):
    cfg = sandbox.sandbox()
    node = cfg.node_name(1)
    pid_file = keymgr_state_dir(sandbox, node) / "wireguard-go.pid"
    old = int(pid_file.read_text())
    peer_key = keys.public_key((keymgr_state_dir(sandbox, cfg.node_name(2)) / f"{DEVICE}.key").read_text().strip())
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    uapi = UapiClient(keymgr_state_dir(sandbox, node) / "sock" / f"{DEVICE}.sock")
    while True:
        try:
            dev = await uapi.get()
            if peer_key in dev.peers and int(pid_file.read_text()) != old:
                break
        except Exception:  # noqa: BLE001 - not back yet
            pass
        assert time.monotonic() - t0 < 10, "device not recreated with its peer within 10 s"
        await asyncio.sleep(0.05)
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"], deadline_s=10)
    print(f"\nwireguard-go killed: device and peers back after {time.monotonic() - t0:.1f}s")
    stream.close()


def propolis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "propolis.cli.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_encrypt_status_rotate_key_and_the_status_line(sandbox):
    cfg = sandbox.sandbox()
    n1, n2 = cfg.node_names()
    proc = propolis("encrypt", "status", "--name", cfg.name, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["mode"] == "Wireguard" and set(doc["nodes"]) == {n1, n2}
    for node, other in ((n1, n2), (n2, n1)):
        st = doc["nodes"][node]
        assert st["listen_port"] == WG_PORT and st["peers"] == 1 and st["backend"] == "wireguard-go"
        assert [p["node"] for p in st["peer_list"]] == [other]
        assert st["peer_list"][0]["public_key"] == doc["nodes"][other]["public_key"]
    text = propolis("encrypt", "status", "--name", cfg.name).stdout
    assert f"Node {n1}" in text and "Number of peers: 1" in text and "LAST HANDSHAKE" in text

    proc = propolis("encrypt", "rotate-key", "--name", cfg.name, "--node", n2)
    assert proc.returncode == 0, proc.stderr
    old = doc["nodes"][n2]["public_key"]
    assert f"{n2}: {old} -> " in proc.stdout and "peers updated on 1 node(s)" in proc.stdout
    new = proc.stdout.split(" -> ")[1].split()[0]
    assert keys.public_key((keymgr_state_dir(sandbox, n2) / f"{DEVICE}.key").read_text().strip()) == new

    proc = propolis("status", "--name", cfg.name, "-o", "json")
    enc = json.loads(proc.stdout)["features"]["Encryption"]
    assert enc["state"] == "Wireguard" and enc["source"] == "wireguard-keymgr"
    assert enc["detail"].startswith("[NodeEncryption: Disabled, cilium_wg0 (Pubkey: ")
    assert enc["detail"].endswith(f"Port: {WG_PORT}, Peers: 1)]")

    proc = propolis("encrypt", "rotate-key", "--name", cfg.name, "--node", "nope")
    assert proc.returncode != 0 and "no wireguard-keymgr on node nope" in proc.stderr


def test_connectivity_test_encryption_scenario_proves_it_on_the_underlay(sandbox):
    proc = propolis("connectivity", "test", "--name", sandbox.sandbox().name, "--test", "encryption", "-o", "json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    (test,) = report["tests"]
    assert test["name"] == "encryption" and test["result"] == "pass", test
    assert len(test["checks"]) == 3
    assert all(c["ok"] and f"UDP {WG_PORT}, no cleartext" in c["detail"] for c in test["checks"]), test
