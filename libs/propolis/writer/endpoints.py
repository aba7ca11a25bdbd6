"""This node's endpoints: what the CNI plugin announced, with stable endpoint ids.

An endpoint is born from a CNI ADD (container id, pod, netns, lxc ifindex,
IP) and dies with CNI DEL. Ids are 1..65535, reused only after release. The
table is saved as JSON next to the datapath socket so a restarted writer knows
which pod each pinned endpoint belongs to (the pinned cilium_lxc map alone
knows only IP -> id).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from propolis.errors import TemporaryError


@dataclass
class LocalEndpoint:
    endpoint_id: int
    container_id: str
    namespace: str
    pod: str
    ip: str
    ifindex: int
    host_ifname: str
    netns: str
    identity: int = 0  # 0 until the identity-allocator's record arrives
    ifname: str = "eth0"  # the pod's interface in its namespace (the Bandwidth Manager shapes its egress there)
    policy_audit_mode: bool = False  # `propolis endpoint config NS/POD PolicyAuditMode=Enabled` (kept across restarts)


class EndpointTable:
    def __init__(self, state_file: Path | None) -> None:
        self.state_file = state_file
        self.by_id: dict[int, LocalEndpoint] = {}

    def load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            for doc in json.loads(self.state_file.read_text()):
                ep = LocalEndpoint(**doc)
                self.by_id[ep.endpoint_id] = ep
        except (ValueError, TypeError) as exc:
            raise TemporaryError(f"endpoint state {self.state_file} unreadable: {exc}") from exc

    def save(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(e) for e in self.by_id.values()]))
        os.replace(tmp, self.state_file)

    def find_container(self, container_id: str) -> LocalEndpoint | None:
        return next((e for e in self.by_id.values() if e.container_id == container_id), None)

    def find_pod(self, namespace: str, pod: str) -> LocalEndpoint | None:
        return next((e for e in self.by_id.values() if (e.namespace, e.pod) == (namespace, pod)), None)

    def allocate_id(self, taken: set[int]) -> int:
        used = set(self.by_id) | taken
        for candidate in range(1, 65536):
            if candidate not in used:
                return candidate
        raise TemporaryError("no free endpoint id on this node (65535 in use)")

    def add(self, ep: LocalEndpoint) -> None:
        self.by_id[ep.endpoint_id] = ep
        self.save()

    def remove(self, endpoint_id: int) -> LocalEndpoint | None:
        ep = self.by_id.pop(endpoint_id, None)
        self.save()
        return ep
