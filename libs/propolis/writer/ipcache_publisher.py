"""This node's slice of the ipcache bucket (`<node>.<ip>` -> IP, identity, node), reconciled through a `KvTarget`.

Other nodes (and clusters) learn our endpoints' identities from it. The actual state is read from the
bus (our keys in `PROPOLIS_IPCACHE_V1`), never from what this process remembers writing: a restarted
writer prunes the entries of endpoints deleted while it was away, a key deleted by hand is written
again at the next refresh, and a publish that failed (NATS away) is retried with back-off instead of
waiting for the next input change.
"""

from __future__ import annotations

from collections.abc import Iterable

from propolis.bus import subjects
from propolis.bus.messages import IpcacheEntry as IpcacheRecord
from propolis.model.types import NodeName
from propolis.writer.endpoints import LocalEndpoint


def desired_records(node: NodeName, endpoints: Iterable[LocalEndpoint]) -> dict[str, IpcacheRecord]:
    """Our endpoints with an identity and an address, keyed as in the bucket."""
    return {subjects.ipcache_key(node, ep.ip): IpcacheRecord(ip=ep.ip, prefix_len=32, identity=ep.identity, node=node)
            for ep in endpoints if ep.identity and ep.ip}
