"""Cluster-wide security identity allocation on NATS KV (the identity-allocator's library)."""
