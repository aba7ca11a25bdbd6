"""How the key manager sits in the suite: optional per sandbox option, its own bus slice, status line."""

from __future__ import annotations

import time

import pytest

from propolis.bus import permissions, subjects
from propolis.bus.messages import Heartbeat
from propolis.errors import ValidationError
from propolis.status import build_report
from propolis.suite import SUITE_SERVICES
from propolis_sandbox.config import SandboxConfig

KEYMGR = next(s for s in SUITE_SERVICES if s.name == "wireguard-keymgr")


def test_keymgr_runs_only_in_an_encrypted_sandbox():
    assert KEYMGR.scope == "node" and not KEYMGR.reports_progress
    assert not KEYMGR.runs_in(SandboxConfig(name="s"))
    assert KEYMGR.runs_in(SandboxConfig(name="s", encryption="wireguard"))
    always = [s for s in SUITE_SERVICES if not s.enabled_by]
    assert always and all(s.runs_in(SandboxConfig(name="s")) for s in always)


def test_sandbox_config_refuses_unknown_encryption():
    with pytest.raises(ValidationError, match="encryption"):
        SandboxConfig(name="s", encryption="ipsec")


def beat(service: str, node: str, features: dict | None = None) -> Heartbeat:
    now = time.time()
    return Heartbeat(service=service, node=node, instance="i" + node[-1], version="0", pid=1, started_at=now - 10,
                     sent_at=now, health="ok", features=features or {}, interval=2.0)


def test_status_expects_keymgr_on_every_node_once_it_runs_anywhere():
    nodes = ["s-worker", "s-worker2"]
    suite = [KEYMGR]
    assert build_report([], now=time.time(), nodes=nodes, suite=suite).healthy  # encryption off: not expected
    rep = build_report([beat("wireguard-keymgr", "s-worker")], now=time.time(), nodes=nodes, suite=suite)
    assert [(r["node"], r["health"]) for r in rep.services if r["health"] == "missing"] == [("s-worker2", "missing")]


def test_status_line_is_the_keymgr_feature():
    detail = "[NodeEncryption: Disabled, cilium_wg0 (Pubkey: abc=, Port: 51871, Peers: 1)]"
    rep = build_report([beat("wireguard-keymgr", "s-worker", {"Encryption": {"state": "Wireguard",
                                                                             "detail": detail}})],
                       now=time.time(), nodes=["s-worker"], suite=[KEYMGR])
    assert rep.features["Encryption"] == {"source": "wireguard-keymgr", "state": "Wireguard", "detail": detail}


def test_keymgr_writes_only_its_own_node_key():
    allow = permissions.publish_allow("wireguard-keymgr", "s-worker")
    assert f"$KV.{subjects.WIREGUARD_BUCKET}.s-worker" in allow
    assert not any(a.startswith(f"$KV.{subjects.WIREGUARD_BUCKET}.") and a.endswith(("*", ">")) for a in allow)
    assert subjects.wireguard_key("s-worker") == "s-worker"
    with pytest.raises(ValidationError):
        subjects.wireguard_key("a.b")
