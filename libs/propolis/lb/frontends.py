"""This node's LB frontends, kept per owner (a Service, or the node's HostPorts), with what changed.

Why: recomputing and diffing every Service on each Service or EndpointSlice event makes one change cost
the whole table (10,000 Services: tens of ms). Here one owner's frontends are replaced alone, and the
frontends whose winner changed are collected until the writer takes them (`take_changes`), so it writes
only those (`Datapath.update_services`). The full rebuild (`replace_all`) stays for the periodic repair.

Two owners claiming one frontend: the first by `Owner` order keeps it — Services by (namespace, name), as
`desired_services` dedupes, and every Service before the HostPorts (a HostPort never takes a Service's).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence

from propolis.lb.desired import LBService

Frontend = tuple[str, int, str]  # (ip, port, protocol), `LBService.frontend`
#: (rank, namespace, name): rank 0 for a Service, 1 for the node's HostPorts (after every Service)
Owner = tuple[int, str, str]
HOSTPORTS: Owner = (1, "", "")


def service_owner(namespace: str, name: str) -> Owner:
    return (0, namespace, name)


class FrontendTable:
    """Frontend -> the `LBService` the maps should hold, from each owner's frontends."""

    def __init__(self) -> None:
        self._by_owner: dict[Owner, dict[Frontend, LBService]] = {}
        self._claims: dict[Frontend, list[Owner]] = {}  # sorted: the first claimant wins
        self.frontends: dict[Frontend, LBService] = {}
        self._changed: set[Frontend] = set()

    def __len__(self) -> int:
        return len(self.frontends)

    def owned(self, owner: Owner) -> Mapping[Frontend, LBService]:
        """What `owner` asked for last (some frontends may be another owner's)."""
        return self._by_owner.get(owner, {})

    def assign(self, owner: Owner, services: Sequence[LBService]) -> None:
        """`owner`'s frontends are now `services` (empty: it has none)."""
        old = self._by_owner.pop(owner, {})
        new: dict[Frontend, LBService] = {}
        for s in services:
            new.setdefault(s.frontend, s)  # within one owner the first keeps it, as `desired_services` does
        if new:
            self._by_owner[owner] = new
        for f in old.keys() - new.keys():
            claimants = self._claims[f]
            claimants.remove(owner)
            if not claimants:
                del self._claims[f]
        for f in new.keys() - old.keys():
            bisect.insort(self._claims.setdefault(f, []), owner)
        for f in old.keys() | new.keys():
            self._resolve(f)

    def replace_all(self, owned: Mapping[Owner, Sequence[LBService]]) -> None:
        """Every owner at once (the full recompute): owners not named have no frontends any more."""
        for owner in [o for o in self._by_owner if o not in owned]:
            self.assign(owner, ())
        for owner, services in owned.items():
            self.assign(owner, services)

    def owners(self) -> Iterable[Owner]:
        return self._by_owner.keys()

    def _resolve(self, frontend: Frontend) -> None:
        claimants = self._claims.get(frontend)
        want = self._by_owner[claimants[0]][frontend] if claimants else None
        have = self.frontends.get(frontend)
        if want is have or want == have:
            return
        if want is None:
            del self.frontends[frontend]
        else:
            self.frontends[frontend] = want
        self._changed.add(frontend)

    def take_changes(self) -> set[Frontend]:
        """Frontends whose desired entry changed (or went) since the last call."""
        changed, self._changed = self._changed, set()
        return changed


__all__ = ["HOSTPORTS", "Frontend", "FrontendTable", "Owner", "service_owner"]
