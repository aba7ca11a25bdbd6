"""The UAPI text protocol as wireguard.com/xplatform documents it: requests built, answers parsed."""

from __future__ import annotations

import pytest

from propolis.encryption import keys, uapi
from propolis.encryption.backend import KernelBackend
from propolis.errors import PermanentError

PRIV = "UF7/3Bg8P9M3MehekHYKiVUo92WuUshIKd6PXll9a2M="
PUB = keys.public_key(PRIV)


def test_set_device_request_is_hex_and_blank_line_terminated():
    req = uapi.set_device_request(private_key=PRIV, listen_port=51871)
    assert req == f"set=1\nprivate_key={keys.to_hex(PRIV)}\nlisten_port=51871\n\n"
    marked = uapi.set_device_request(private_key=PRIV, listen_port=51871, fwmark=0x1E00)
    assert marked == f"set=1\nprivate_key={keys.to_hex(PRIV)}\nlisten_port=51871\nfwmark=7680\n\n"


def test_set_peer_request_replaces_allowed_ips():
    peer = uapi.PeerConfig(PUB, "172.30.1.2:51871", ("10.244.2.0/24",), 25, "n2")
    assert uapi.set_peer_request(peer).splitlines() == [
        "set=1", f"public_key={keys.to_hex(PUB)}", "endpoint=172.30.1.2:51871",
        "persistent_keepalive_interval=25", "replace_allowed_ips=true", "allowed_ip=10.244.2.0/24", ""]


def test_remove_peer_request():
    assert uapi.remove_peer_request(PUB) == f"set=1\npublic_key={keys.to_hex(PUB)}\nremove=true\n\n"


def test_parse_get_answer():
    answer = (f"private_key={keys.to_hex(PRIV)}\nlisten_port=51871\npublic_key={keys.to_hex(PUB)}\n"
              "preshared_key=" + "0" * 64 + "\nprotocol_version=1\nendpoint=172.30.1.2:51871\n"
              "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
              "tx_bytes=3508\nrx_bytes=3168\npersistent_keepalive_interval=0\n"
              "allowed_ip=10.244.2.0/24\nallowed_ip=10.244.3.0/24\nerrno=0\n\n")
    dev = uapi.parse_get(uapi._check_errno(answer, "get"))
    assert dev.private_key == PRIV and dev.listen_port == 51871
    peer = dev.peers[PUB]
    assert peer.endpoint == "172.30.1.2:51871"
    assert peer.allowed_ips == ["10.244.2.0/24", "10.244.3.0/24"]
    assert (peer.tx_bytes, peer.rx_bytes) == (3508, 3168)
    assert peer.last_handshake == pytest.approx(1700000000.5)


def test_nonzero_errno_is_an_error_naming_the_request():
    with pytest.raises(PermanentError, match="set peer n2.*errno=22"):
        uapi._check_errno("errno=22\n\n", "set peer n2")


def test_kernel_backend_requests():
    """The pyroute2 backend is not exercised on this kernel (no WireGuard module): only its requests are."""
    kb = KernelBackend(netns=None)
    assert kb.device_request(private_key=PRIV, listen_port=51871, fwmark=0x1E00) == {
        "interface": "cilium_wg0", "private_key": PRIV, "listen_port": 51871, "fwmark": 0x1E00}
    peer = uapi.PeerConfig(PUB, "172.30.1.2:51871", ("10.244.2.0/24",), 0, "n2")
    assert kb.peer_request(peer) == {"interface": "cilium_wg0", "peer": {
        "public_key": PUB, "endpoint_addr": "172.30.1.2", "endpoint_port": 51871, "persistent_keepalive": 0,
        "allowed_ips": ["10.244.2.0/24"]}}
    assert kb.peer_request(remove=PUB) == {"interface": "cilium_wg0", "peer": {"public_key": PUB, "remove": True}}
