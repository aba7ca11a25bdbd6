"""The per-node WireGuard key manager: key pair, device, publication, peers and routes.

Components (started in this order, stopped in reverse):

* `DeviceComponent` — the node's key pair (generated on first start, private key
  in a root-only file under the state directory) and `cilium_wg0` listening on
  UDP 51871: adopted when a wireguard-go from an earlier run still answers, so a
  restart never tears the tunnel down.
* `PublisherComponent` — the public key into ``PROPOLIS_WIREGUARD_V1`` (key = node
  name; only this node's keymgr may write it) and the Node annotation
  ``network.cilium.io/wg-pub-key``, both reconciler targets (written back when
  changed behind its back); answers ``propolis encrypt rotate-key``.
* `PeersComponent` — watches Nodes (k8s bucket) and keys (wireguard bucket),
  computes the desired device (`desired.compute`) and hands peers and routes to
  `Reconciler`s (with `encryption.nodeEncryption` also the WireGuard routing
  table node traffic meets first, `targets.set_node_encryption_rule`); pruning waits until both watches delivered their initial
  state. Refused nodes are logged (naming the node) once per reason and sent as
  events on ``propolis.v1.events.encryption``.

`propolis encrypt status` shows it all; the heartbeat's ``features.Encryption``
is what `propolis status` prints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from propolis.bus import subjects
from propolis.bus.kv import EventType, Kv
from propolis.bus.kv_target import KvTarget
from propolis.bus.messages import Event, K8sObject, WireguardNodeKey
from propolis.encryption import keys
from propolis.encryption.backend import DEVICE, WireguardBackend, select_backend
from propolis.encryption.desired import NodeInfo, compute, node_info
from propolis.encryption.targets import (
    WIREGUARD_ROUTE_TABLE,
    PeerTarget,
    RouteTarget,
    set_link_up,
    set_node_encryption_rule,
)
from propolis.encryption.uapi import PeerConfig
from propolis.reconcile import Reconciler
from propolis.runtime.component import Component
from propolis.runtime.health import Health, State
from propolis.runtime.service import Runtime

log = logging.getLogger("propolis.encryption.keymgr")

SERVICE = "wireguard-keymgr"
WG_PUBKEY_ANNOTATION = "network.cilium.io/wg-pub-key"
PRIVATE_KEY_FILE = f"{DEVICE}.key"
#: How often the keymgr checks that its device still answers (two misses in a row = recreate it).
DEVICE_CHECK_INTERVAL_S = 0.5


class DeviceComponent(Component):
    name, title = "device", f"key pair and the {DEVICE} device (wireguard-go or kernel)"

    def __init__(self, *, node: str, netns: str | None, state_dir: Path, listen_port: int, backend: str,
                 fwmark: int = 0) -> None:
        super().__init__()
        self.node, self.netns, self.state_dir, self.listen_port = node, netns, state_dir, listen_port
        self.fwmark = fwmark  # of the device's own UDP packets (nodeEncryption routes by it)
        self.backend_choice = backend
        self.backend: WireguardBackend | None = None
        self.private_key = ""
        self.public_key = ""
        self.adopted = False
        self.recreated = 0  # times the watchdog had to recreate the device
        self.on_recreated: list[Callable[[], None]] = []

    @property
    def key_path(self) -> Path:
        return self.state_dir / PRIVATE_KEY_FILE

    async def start(self, rt: Runtime) -> None:
        self.private_key, created = keys.load_or_create(self.key_path)
        self.public_key = keys.public_key(self.private_key)
        log.info("%s key pair for %s (public %s, private key in %s)", "generated" if created else "loaded",
                 self.node, self.public_key, self.key_path)
        self.backend = select_backend(self.backend_choice, state_dir=self.state_dir, netns=self.netns)
        self.adopted = await self.backend.ensure_device(private_key=self.private_key, listen_port=self.listen_port,
                                                        fwmark=self.fwmark)
        await asyncio.to_thread(set_link_up, self.netns)
        rt.progress["wireguard"] = {"public_key": self.public_key, **self.backend.describe()}
        rt.spawn("device-watchdog", self._watchdog(), self)
        self.set_ok()

    async def _watchdog(self) -> None:
        """A dead device (wireguard-go crashed or was killed) is recreated, and whoever registered in
        `on_recreated` re-applies peers and routes (they went with the device)."""
        assert self.backend is not None
        while True:
            await asyncio.sleep(DEVICE_CHECK_INTERVAL_S)
            try:
                await self.backend.device()
                continue
            except Exception as exc:  # noqa: BLE001 - any failure to answer: check again, then recreate
                reason = str(exc)
            await asyncio.sleep(DEVICE_CHECK_INTERVAL_S)  # one more chance (a slow answer is not a death)
            try:
                await self.backend.device()
                continue
            except Exception:  # noqa: BLE001
                pass
            log.warning("%s on %s does not answer (%s): recreating it", DEVICE, self.node, reason)
            self.set_degraded(f"{DEVICE} recreated after: {reason}")
            try:
                await self.backend.ensure_device(private_key=self.private_key, listen_port=self.listen_port,
                                                 fwmark=self.fwmark)
                await asyncio.to_thread(set_link_up, self.netns)
            except Exception as exc:  # noqa: BLE001 - stays degraded; next round retries
                log.warning("recreating %s failed: %s", DEVICE, exc)
                continue
            self.recreated += 1
            for callback in self.on_recreated:
                callback()
            self.set_ok()

    async def rotate(self) -> str:
        """New key pair: file first (a crash after this keeps the new key), then the device."""
        assert self.backend is not None
        new = keys.generate_private_key()
        keys.write_private_key(self.key_path, new)
        await self.backend.ensure_device(private_key=new, listen_port=self.listen_port, fwmark=self.fwmark)
        self.private_key, self.public_key = new, keys.public_key(new)
        log.info("rotated the key of %s: new public key %s", self.node, self.public_key)
        return self.public_key


class NodeAnnotationTarget:
    """``network.cilium.io/wg-pub-key`` on the node's Node object (key = node name, value = public key), where
    Cilium keeps it too. ``refresh`` reads the Node, so an annotation removed or changed by hand comes back;
    nothing is ever pruned (the annotation outlives a keymgr restart)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    async def update(self, node: str, public_key: str) -> None:
        await self.api.call_api(f"/api/v1/nodes/{node}", "PATCH",
                                header_params={"Content-Type": "application/merge-patch+json",
                                               "Accept": "application/json"},
                                body={"metadata": {"annotations": {WG_PUBKEY_ANNOTATION: public_key}}},
                                auth_settings=["BearerToken"], _preload_content=False,
                                _return_http_data_only=True, _request_timeout=5)

    async def refresh(self, node: str, public_key: str) -> None:
        response = await self.api.call_api(f"/api/v1/nodes/{node}", "GET", header_params={"Accept": "application/json"},
                                           auth_settings=["BearerToken"], _preload_content=False,
                                           _return_http_data_only=True, _request_timeout=5)
        annotations = ((await response.json()).get("metadata") or {}).get("annotations") or {}
        if annotations.get(WG_PUBKEY_ANNOTATION) != public_key:
            await self.update(node, public_key)

    async def delete(self, node: str) -> None:
        pass  # never desired away: the key stays announced while the node exists

    async def list_actual(self) -> list[str]:
        return []


class PublisherComponent(Component):
    """The node's public key where the cluster reads it, as two reconciler targets: the node's entry of
    ``PROPOLIS_WIREGUARD_V1`` (`KvTarget`; the other nodes' peers come from it) and, with a kubeconfig, the Node
    annotation. A watch on the entry asks for an immediate refresh when anything else lands there (an admin's
    mistake, a bucket that lost its store), so the other nodes never keep a wrong key for long; the periodic
    refresh repairs what the watch could not see (NATS away at that moment). Answers ``encrypt rotate-key``."""

    name, title = "publish", "public key on the bus and as Node annotation; answers rotate-key"

    def __init__(self, device: DeviceComponent, *, kubeconfig: str, refresh_interval: float = 30.0) -> None:
        super().__init__()
        self.device = device
        self.kubeconfig = kubeconfig
        self.refresh_interval = refresh_interval
        self._sub: Any = None
        self._api: Any = None
        self.rotated_at = 0.0
        self.annotation: Reconciler[str, str] | None = None

    async def start(self, rt: Runtime) -> None:
        kv = await rt.bus.kv(subjects.WIREGUARD_BUCKET)
        key = subjects.wireguard_key(self.device.node)
        current = await kv.get(key)
        if current is not None and isinstance(current.value, WireguardNodeKey):
            self.rotated_at = current.value.rotated_at
        self.entry: Reconciler[str, WireguardNodeKey] = Reconciler(
            "wireguard-key", KvTarget(kv, key), refresh_interval=self.refresh_interval)
        self.entry.mark_synced()  # one key, always desired: nothing to prune
        rt.spawn("key-reconciler", self.entry.run(), self)
        if self.kubeconfig:  # no API, no Node to annotate
            from propolis.k8s import kubeclient
            conf = kubeclient.Configuration()
            await kubeclient.load_kube_config(config_file=self.kubeconfig, client_configuration=conf)
            self._api = kubeclient.ApiClient(configuration=conf)
            self.annotation = Reconciler("wg-pub-key-annotation", NodeAnnotationTarget(self._api),
                                         refresh_interval=self.refresh_interval)
            rt.spawn("annotation-reconciler", self.annotation.run(), self)
        self.publish()
        await self.entry.wait_until_reconciled(timeout=10.0)
        self._sub = await rt.bus.subscribe(subjects.encryption_rotate_subject(self.device.node), self._on_rotate)
        rt.spawn("watch-key", self._watch_entry(kv, key), self)
        self.set_ok()

    async def _watch_entry(self, kv: Kv, key: str) -> None:
        async for ev in kv.watch(key):
            if ev.type is EventType.SYNCED:
                continue
            if ev.type is not EventType.PUT or ev.value != self.entry.desired.get(key):
                log.warning("entry %s of %s is %s, not this node's key: writing it back", key,
                            subjects.WIREGUARD_BUCKET, "gone" if ev.type is not EventType.PUT else repr(ev.value)[:120])
                self.entry.queue_refresh()

    def publish(self) -> int:
        """Desired = the device's current key; returns the entry reconciler's revision of the change."""
        d = self.device
        if self.annotation is not None:
            self.annotation.upsert(d.node, d.public_key)
        return self.entry.upsert(subjects.wireguard_key(d.node),
                                 WireguardNodeKey(d.node, d.public_key, d.listen_port, self.rotated_at))

    async def _on_rotate(self, _request: Any, msg: Any) -> None:
        await self.device.rotate()
        self.rotated_at = time.time()
        failed = await self.entry.wait_until_reconciled(self.publish(), timeout=10.0)
        d = self.device
        if msg.reply:
            from propolis.bus import codec
            if failed:
                log.warning("rotated key of %s not published yet (retrying): %s", d.node, failed)
            await msg.respond(codec.encode(WireguardNodeKey(d.node, d.public_key, d.listen_port, self.rotated_at)))

    @property
    def health(self) -> Health:
        own = super().health
        if own.state is not State.OK or own.reason == "starting":
            return own
        for reconciler in (self.entry, self.annotation):
            if reconciler is not None and reconciler.health().state is not State.OK:
                return reconciler.health()
        return own

    @health.setter
    def health(self, value: Health) -> None:
        self._health = value

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self._api is not None:
            await self._api.close()


class PeersComponent(Component):
    name, title = "peers", f"one {DEVICE} peer per other node and routes of their pod CIDRs, from the bus"

    def __init__(self, device: DeviceComponent, *, persistent_keepalive: int, node_encryption: bool,
                 debounce: float = 0.005) -> None:
        super().__init__()
        self.device = device
        self.persistent_keepalive = persistent_keepalive
        self.node_encryption = node_encryption
        self.debounce = debounce
        self.nodes: dict[str, NodeInfo] = {}
        self.node_keys: dict[str, Any] = {}
        self.synced: set[str] = set()
        self.refused: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def start(self, rt: Runtime) -> None:
        assert self.device.backend is not None
        self.rt = rt
        self.peers: Reconciler[str, PeerConfig] = Reconciler("wireguard-peers", PeerTarget(self.device.backend),
                                                              refresh_interval=30.0)
        self.routes: Reconciler[str, str] = Reconciler("wireguard-routes", RouteTarget(self.device.netns),
                                                       refresh_interval=30.0)
        self.node_routes: Reconciler[str, str] = Reconciler(
            "wireguard-node-routes", RouteTarget(self.device.netns, table=WIREGUARD_ROUTE_TABLE), refresh_interval=30.0)
        await asyncio.to_thread(set_node_encryption_rule, self.device.netns, self.node_encryption)
        self.device.on_recreated.append(self._reapply)
        rt.spawn("peer-reconciler", self.peers.run(), self)
        rt.spawn("route-reconciler", self.routes.run(), self)
        rt.spawn("node-route-reconciler", self.node_routes.run(), self)
        rt.spawn("watch-nodes", self._watch(subjects.K8S_BUCKET, subjects.k8s_keys("nodes")), self)
        rt.spawn("watch-keys", self._watch(subjects.WIREGUARD_BUCKET, ">"), self)
        rt.spawn("compute", self._compute_loop(), self)
        rt.spawn("report", self._report_loop(), self)

    @property
    def _reconcilers(self) -> tuple[Reconciler[str, Any], ...]:
        return (self.peers, self.routes, self.node_routes)

    def _reapply(self) -> None:
        """The device was recreated empty: remove-then-add every peer and route so the reconcilers redo them."""
        for rec in self._reconcilers:
            desired = dict(rec.desired)
            rec.replace_all({})
            rec.replace_all(desired)

    async def _watch(self, bucket: str, keys_filter: str) -> None:
        kv = await self.rt.bus.kv(bucket)
        async for ev in kv.watch(keys_filter):
            if ev.type is EventType.SYNCED:
                self.synced.add(bucket)
            elif bucket == subjects.K8S_BUCKET:
                parsed = subjects.parse_k8s_key(ev.key)
                if parsed is None:
                    continue
                name = parsed.name
                if ev.type is EventType.PUT and isinstance(ev.value, K8sObject):
                    self.nodes[name] = node_info(ev.value)
                else:
                    self.nodes.pop(name, None)
            elif ev.type is EventType.PUT:
                self.node_keys[subjects.node_of_key(ev.key)] = ev.value
            else:
                self.node_keys.pop(subjects.node_of_key(ev.key), None)
            self.changed.set()

    async def _compute_loop(self) -> None:
        while True:
            await self.changed.wait()
            await asyncio.sleep(self.debounce)
            self.changed.clear()
            await self.recompute()

    async def recompute(self) -> None:
        want = compute(own_node=self.device.node, nodes=self.nodes, node_keys=self.node_keys,
                       persistent_keepalive=self.persistent_keepalive, node_encryption=self.node_encryption)
        news = {node: why for node, why in want.refused.items() if self.refused.get(node) != why}
        self.refused = want.refused
        self.peers.replace_all(want.peers)
        self.routes.replace_all(want.routes)
        self.node_routes.replace_all(want.encrypted_routes)
        if self.synced >= {subjects.K8S_BUCKET, subjects.WIREGUARD_BUCKET}:
            for rec in self._reconcilers:
                rec.mark_synced()
        for node, why in news.items():
            log.warning("node %s refused as WireGuard peer: %s", node, why)
            await self._event(node, why)

    async def _event(self, node: str, why: str) -> None:
        try:
            await self.rt.bus.publish(subjects.events_subject("encryption"),
                                      Event("WireguardPeerRefused", f"Node {node}", why, SERVICE,
                                            self.device.node, time.time()))
        except Exception as exc:  # noqa: BLE001 - the log line above already says it
            log.debug("event for %s not sent: %s", node, exc)

    async def _report_loop(self) -> None:
        """Health, the `status` feature line and the progress `propolis encrypt status` reads."""
        while True:
            errors = {**self.peers.errors(), **self.routes.errors(), **self.node_routes.errors()}
            if errors:
                self.set_degraded(f"{len(errors)} errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items())[:300])
            elif self.refused:
                self.set_degraded("refused: " + "; ".join(f"{n}: {w}" for n, w in sorted(self.refused.items()))[:300])
            else:
                self.set_ok()
            d = self.device
            npeers = len(self.peers.desired)
            try:
                actual = (await d.backend.device()).peers if d.backend else {}
            except Exception as exc:  # noqa: BLE001 - the device is the peers reconciler's to report on
                log.debug("device state unreadable: %s", exc)
                actual = {}
            self.rt.features["Encryption"] = {
                "state": "Wireguard",
                "detail": f"[NodeEncryption: {'Enabled' if self.node_encryption else 'Disabled'}, "
                          f"{DEVICE} (Pubkey: {d.public_key}, Port: {d.listen_port}, Peers: {npeers})]"}
            self.rt.progress["wireguard"] = {
                "public_key": d.public_key, "listen_port": d.listen_port, "peers": npeers,
                "peers_reconciled": self.peers.reconciled_revision >= self.peers.revision,
                "routes": sorted(self.routes.desired), "refused": dict(self.refused),
                "node_encryption": self.node_encryption, "node_routes": sorted(self.node_routes.desired),
                "device_recreated": d.recreated,
                "peer_list": [{"node": p.node, "public_key": k, "endpoint": p.endpoint,
                               "allowed_ips": list(p.allowed_ips),
                               "last_handshake": actual[k].last_handshake if k in actual else 0.0,
                               "rx_bytes": actual[k].rx_bytes if k in actual else 0,
                               "tx_bytes": actual[k].tx_bytes if k in actual else 0,
                               "configured": k in actual}
                              for k, p in sorted(self.peers.desired.items(), key=lambda kv: kv[1].node)],
                **(d.backend.describe() if d.backend else {})}
            await asyncio.sleep(0.5)


