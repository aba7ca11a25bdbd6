"""`IP.encrypted` on flows (WireGuard) and the `--encrypted` / `--unencrypted` filters on it."""

from __future__ import annotations

import argparse

import pytest
from hubble_helpers import A_IP, B_IP, WORLD_IP, make_enricher, make_event

from propolis.bus.messages import EndpointRecord, WireguardNodeKey
from propolis.errors import ValidationError
from propolis.hubble.filters import FlowMatcher, compile_filter
from propolis.hubble.flow import to_flow
from propolis.hubble.observe_args import add_filter_flags, build_filters

KEY = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE="
C_IP = "10.244.2.30"  # a second pod on n2, beside backend (B_IP)


def wireguard_enricher(*nodes: str):
    e = make_enricher()
    e.identities_event("endpoints.shop.cache-0", EndpointRecord("shop", "cache-0", "n2", [C_IP], 40002, []))
    for node in nodes:
        e.wireguard_event(node, WireguardNodeKey(node, KEY, 51871))
    return e


def encrypted(enricher, node="n2", **kw) -> bool:
    return bool(to_flow(make_event(**kw), node=node, enricher=enricher)["IP"].get("encrypted"))


def test_cross_node_pod_flow_is_encrypted_when_both_nodes_run_wireguard():
    e = wireguard_enricher("n1", "n2")
    assert encrypted(e)  # frontend (n1) -> backend (n2), seen on n2
    assert encrypted(e, node="n1", direction=2)  # the same flow seen leaving n1
    assert encrypted(e, src_ip=B_IP, dst_ip=A_IP)  # the reply


def test_same_node_host_world_and_unencrypted_nodes_are_not_encrypted():
    e = wireguard_enricher("n1", "n2")
    assert not encrypted(e, src_ip=C_IP)  # cache-0 -> backend, both on n2
    assert not encrypted(e, src_ip=WORLD_IP)  # nodeEncryption off: world/host traffic is not tunnelled
    assert not encrypted(wireguard_enricher("n2"))  # the peer node runs no WireGuard
    assert not encrypted(wireguard_enricher("n1"))  # this node runs no WireGuard
    assert "encrypted" not in to_flow(make_event(), node="n2", enricher=make_enricher())["IP"]  # false left out


def test_strict_mode_drop_is_not_encrypted():
    """UNENCRYPTED_TRAFFIC is the drop of a packet that went around the tunnel."""
    e = wireguard_enricher("n1", "n2")
    flow = to_flow(make_event(type=1, direction=2, verdict=2, drop_reason=195), node="n1", enricher=e)
    assert flow["drop_reason_desc"] == "UNENCRYPTED_TRAFFIC" and "encrypted" not in flow["IP"]


def test_key_removed_or_foreign_entry_turns_encryption_off_for_that_node():
    e = wireguard_enricher("n1", "n2")
    e.wireguard_event("n1", None)
    assert not encrypted(e)
    e.wireguard_event("n1", WireguardNodeKey("n3", KEY, 51871))  # another node's key under n1: not n1's peer
    assert not encrypted(e)


ENC = to_flow(make_event(), node="n2", enricher=wireguard_enricher("n1", "n2"))
PLAIN = to_flow(make_event(src_ip=C_IP), node="n2", enricher=wireguard_enricher("n1", "n2"))


def test_encrypted_filter_field():
    assert compile_filter({"encrypted": [True]})(ENC) and not compile_filter({"encrypted": [True]})(PLAIN)
    assert compile_filter({"encrypted": ["false"]})(PLAIN) and not compile_filter({"encrypted": [False]})(ENC)
    with pytest.raises(ValidationError, match="encrypted"):
        compile_filter({"encrypted": ["yes"]})


def parse(*argv: str):
    p = argparse.ArgumentParser()
    add_filter_flags(p)
    return build_filters(p.parse_args(list(argv)).filter_ops)


def test_encrypted_and_unencrypted_flags():
    assert parse("--encrypted") == ([{"encrypted": [True]}], [])
    assert parse("--unencrypted", "--protocol", "tcp") == ([{"encrypted": [False], "protocol": ["tcp"]}], [])
    assert parse("--not", "--encrypted") == ([], [{"encrypted": [True]}])
    allow, deny = parse("--encrypted")
    assert FlowMatcher(allow, deny)(ENC) and not FlowMatcher(allow, deny)(PLAIN)
    allow, deny = parse("--unencrypted")
    assert FlowMatcher(allow, deny)(PLAIN) and not FlowMatcher(allow, deny)(ENC)
