"""The NATS permissions give each node's wireguard-keymgr its own key in PROPOLIS_WIREGUARD_V1 and nothing
else: a node cannot publish (or overwrite) another node's WireGuard key."""

from __future__ import annotations

import asyncio

import nats
import pytest

from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import WireguardNodeKey
from propolis.encryption import keys


async def test_a_keymgr_writes_only_its_own_node_key(tmp_path):
    admin, users = permissions.generate_credentials(["wireguard-keymgr"], nodes={"wireguard-keymgr": ["n1", "n2"]})
    conf = permissions.server_config(users, admin=admin)
    async with EmbeddedNats(tmp_path / "nats", config_text=conf) as server:
        adm = Bus(server.url, name="admin", user=admin.user, password=admin.password)
        await adm.connect(max_wait=5)
        await adm.ensure_buckets()
        cred = users[permissions.user_name("wireguard-keymgr", "n1")]
        n1 = Bus(server.url, name="keymgr-n1", user=cred.user, password=cred.password)
        await n1.connect(max_wait=5)
        try:
            kv = await n1.kv(subjects.WIREGUARD_BUCKET)
            mine = WireguardNodeKey("n1", keys.public_key(keys.generate_private_key()), 51871)
            await kv.put(subjects.wireguard_key("n1"), mine)
            assert (await kv.get(subjects.wireguard_key("n1"))).value == mine
            forged = WireguardNodeKey("n2", keys.public_key(keys.generate_private_key()), 51871)
            with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                await asyncio.wait_for(kv.put(subjects.wireguard_key("n2"), forged), 3)
            assert await (await adm.kv(subjects.WIREGUARD_BUCKET)).get(subjects.wireguard_key("n2")) is None
        finally:
            await n1.close()
            await adm.close()
