"""Names for the numbers and strings that cross module boundaries, so signatures say what they carry.

Why: an identity number, a KV revision, a Kubernetes resourceVersion and a node name are all plain
ints and strs at run time, and each has been passed where another was meant. ``NewType`` costs nothing
at run time (the value stays an int/str, and any int/str API takes it) while mypy refuses, say, a KV
revision where a resourceVersion is expected. Values are made at the boundary that knows what they are
(the allocator, a bus decode, the settings loader), not at every call site.
"""

from __future__ import annotations

from typing import NewType

#: A security identity's number (Cilium's ``identity.NumericIdentity``): reserved 1..255, cluster-local
#: 256..65535 shifted by the cluster id, node-local CIDR/FQDN identities from 1 << 24 (propolis.model.identity).
NumericIdentity = NewType("NumericIdentity", int)

#: A JetStream KV revision: the stream sequence of one put/delete, what compare-and-set updates compare.
Revision = NewType("Revision", int)

#: A Kubernetes resourceVersion read as an integer (the API server's etcd revision; the watermark a mirror
#: has caught up to). A different counter from `Revision`: never compare the two.
ResourceVersion = NewType("ResourceVersion", int)

#: A Kubernetes node's name (``S-worker``, ``S-worker2``…): what per-node keys, subjects and settings name.
NodeName = NewType("NodeName", str)

__all__ = ["NodeName", "NumericIdentity", "ResourceVersion", "Revision"]
