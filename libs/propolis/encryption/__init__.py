"""Transparent encryption (Cilium's `encryption.type=wireguard`): keys, the WireGuard device, its peers.

`keys` (X25519 key pairs, the root-only private key file), `uapi` (the
wireguard-go configuration protocol), `backend` (kernel via pyroute2 or
userspace via wireguard-go, one interface), `desired` (peers and routes from the
bus, pure), `targets` (reconciler targets), `keymgr` (the per-node key
manager's components; `services/wireguard_keymgr` wires them).
"""
