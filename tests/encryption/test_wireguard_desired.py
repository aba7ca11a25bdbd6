"""Desired peers and routes from Nodes and published keys; bad input refused per node, the rest kept."""

from __future__ import annotations

from propolis.bus.messages import K8sObject, WireguardNodeKey
from propolis.encryption import keys
from propolis.encryption.desired import NodeInfo, compute, node_info

K1, K2, K3 = (keys.public_key(keys.generate_private_key()) for _ in range(3))


def nodes(*names: str) -> dict[str, NodeInfo]:
    return {n: NodeInfo(n, f"172.30.1.{i}", (f"10.244.{i}.0/24",)) for i, n in enumerate(names, 1)}


def key(node: str, pub: str, port: int = 51871) -> WireguardNodeKey:
    return WireguardNodeKey(node, pub, port)


def test_one_peer_per_other_node():
    want = compute(own_node="w1", nodes=nodes("w1", "w2", "w3"),
                   node_keys={"w1": key("w1", K1), "w2": key("w2", K2), "w3": key("w3", K3)})
    assert set(want.peers) == {K2, K3}
    assert want.peers[K2].endpoint == "172.30.1.2:51871"
    # the node IP too, without nodeEncryption: a NodePort reply from w2's backend has it as its source
    assert want.peers[K2].allowed_ips == ("10.244.2.0/24", "172.30.1.2/32")
    assert want.routes == {"10.244.2.0/24": "w2", "10.244.3.0/24": "w3"}
    assert want.refused == {}


def test_node_without_key_yet_is_routed_but_has_no_peer():
    want = compute(own_node="w1", nodes=nodes("w1", "w2"), node_keys={"w1": key("w1", K1)})
    assert want.peers == {} and want.routes == {"10.244.2.0/24": "w2"} and want.refused == {}


def test_bad_keys_are_refused_naming_the_node_and_others_keep_their_peer():
    want = compute(own_node="w1", nodes=nodes("w1", "w2", "w3", "w4", "w5"),
                   node_keys={"w1": key("w1", K1), "w2": key("w2", "bm90IGEga2V5"),  # malformed
                              "w3": key("w2", K3),  # foreign: w3's entry claims w2
                              "w4": key("w4", K1),  # duplicate of our own key
                              "w5": key("w5", K2)})
    assert set(want.peers) == {K2} and want.peers[K2].node == "w5"
    assert "44 characters" in want.refused["w2"]
    assert "foreign key" in want.refused["w3"] and "w2" in want.refused["w3"]
    assert "duplicate" in want.refused["w4"] and "w1" in want.refused["w4"]
    # refused nodes' pod CIDRs still go into the tunnel: without a peer WireGuard drops them (fail closed)
    assert set(want.routes.values()) == {"w2", "w3", "w4", "w5"}


def test_node_without_internal_ip_is_refused():
    ns = nodes("w1", "w2")
    ns["w2"] = NodeInfo("w2", "", ("10.244.2.0/24",))
    want = compute(own_node="w1", nodes=ns, node_keys={"w2": key("w2", K2)})
    assert want.peers == {} and "InternalIP" in want.refused["w2"]


def test_undecodable_entry_is_refused():
    want = compute(own_node="w1", nodes=nodes("w1", "w2"), node_keys={"w2": {"junk": 1}})
    assert "undecodable" in want.refused["w2"]


def test_node_info_from_mirrored_node():
    obj = K8sObject("Node", "", "w2", "uid", "7", fields={"podCIDR": "10.244.2.0/24"},
                    status={"addresses": [{"type": "Hostname", "address": "w2"},
                                          {"type": "InternalIP", "address": "172.30.1.2"}]})
    assert node_info(obj) == NodeInfo("w2", "172.30.1.2", ("10.244.2.0/24",))


def test_node_encryption_adds_the_wireguard_table():
    want = compute(own_node="w1", nodes=nodes("w1", "w2", "w3"),
                   node_keys={"w1": key("w1", K1), "w2": key("w2", K2)}, node_encryption=True)
    assert want.peers[K2].allowed_ips == ("10.244.2.0/24", "172.30.1.2/32")
    assert want.routes == {"10.244.2.0/24": "w2", "10.244.3.0/24": "w3"}  # the main table is unchanged
    # w3 has no key yet: its node IP and pod CIDR still go into the device (fail closed, never cleartext)
    assert want.encrypted_routes == {"10.244.2.0/24": "w2", "172.30.1.2/32": "w2",
                                     "10.244.3.0/24": "w3", "172.30.1.3/32": "w3"}
    plain = compute(own_node="w1", nodes=nodes("w1", "w2"), node_keys={"w2": key("w2", K2)})
    assert plain.encrypted_routes == {} and plain.peers[K2].allowed_ips == want.peers[K2].allowed_ips
