"""The nats-server users made from the ownership table: per-node users name their node, no service may
delete, drain or name consumers, an unknown service writes nothing, and the credentials file is root-only."""

from __future__ import annotations

import json
import stat

from propolis.bus import permissions, subjects


def users_of(conf: str) -> dict[str, list[str]]:
    doc = json.loads(conf.removeprefix("authorization "))
    return {u["user"]: u.get("permissions", {}).get("publish", {}).get("allow", ["<everything>"]) for u in doc["users"]}


def test_each_node_user_writes_only_its_own_node():
    admin, users = permissions.generate_credentials(["datapath-writer", "hubble", "identity-allocator"],
                                                    nodes={"datapath-writer": ["n1", "n2"], "hubble": ["n1", "n2"]})
    assert sorted(users) == ["datapath-writer@n1", "datapath-writer@n2", "hubble@n1", "hubble@n2",
                             "identity-allocator"]
    assert len({c.password for c in users.values()} | {admin.password}) == 6  # no shared passwords
    allow = users_of(permissions.server_config(users, admin=admin))
    assert allow["admin"] == ["<everything>"]
    assert f"$KV.{subjects.IPCACHE_BUCKET}.n1.>" in allow["datapath-writer@n1"]
    assert not any(".n2." in s or s.endswith(".n2") for s in allow["datapath-writer@n1"] + allow["hubble@n1"])
    assert f"$KV.{subjects.HEARTBEATS_BUCKET}.hubble.n1.>" in allow["hubble@n1"]  # beats only as its node
    assert f"$KV.{subjects.IDENTITIES_BUCKET}.>" in allow["identity-allocator"]
    assert not any(subjects.IDENTITIES_BUCKET in s for u, a in allow.items() if u != "identity-allocator"
                   and u != "admin" for s in a)


def test_no_service_may_delete_drain_or_name_consumers():
    for allowed in permissions.READER_API:
        assert not allowed.startswith(("$JS.API.CONSUMER.DELETE", "$JS.API.CONSUMER.DURABLE",
                                       "$JS.API.CONSUMER.MSG.NEXT", "$JS.API.STREAM.DELETE",
                                       "$JS.API.STREAM.CREATE", "$JS.API.STREAM.UPDATE")), allowed
    # `CREATE.*` = the stream token only: the server names the consumer, a name token would be a 6th
    assert "$JS.API.CONSUMER.CREATE.*" in permissions.READER_API


def test_a_service_without_a_slice_may_read_but_write_nothing():
    assert permissions.publish_allow("not-in-the-table") == permissions.READER_API


def test_credentials_file_is_root_only(tmp_path):
    admin, users = permissions.generate_credentials(["hubble"])
    path = tmp_path / "nats" / "credentials.json"
    permissions.save_credentials(path, admin, users)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert permissions.load_credentials(path) == (admin, users)
