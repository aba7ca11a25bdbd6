"""A service is a list of components with a lifecycle (like cilium/hive).

A component has a name, a one-line title, and start/stop. Constructors do no
I/O. The runtime starts components in list order and stops them in reverse —
only those that started. Long-running work is spawned with `Runtime.spawn`
so a task that dies is logged, turns its component Failed (sticky: no later
`set_ok` erases it) and ends the process non-zero for its supervisor to restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from propolis.runtime.health import Health

if TYPE_CHECKING:
    from propolis.runtime.service import Runtime


class Component:
    name: str = "component"
    title: str = ""

    def __init__(self, *requires: Component) -> None:
        self._health: Health = Health.stopped("not started")
        self.failure = ""  # set by the runtime when a guarded task of this component died
        #: the components this one uses (declared, like hive's constructor parameters): they start before it
        self.requires: tuple[Component, ...] = requires

    @property
    def health(self) -> Health:
        """What the component says, unless one of its tasks died: that wins until the process exits."""
        return Health.failed(self.failure) if self.failure else self._health

    @health.setter
    def health(self, value: Health) -> None:
        self._health = value

    async def start(self, rt: Runtime) -> None:
        """Acquire resources and spawn tasks; return once the component can serve."""

    async def stop(self) -> None:
        """Release what start acquired; tasks spawned with rt.spawn are cancelled by the runtime."""

    def set_ok(self, reason: str = "") -> None:
        self.health = Health.ok(reason)

    def set_degraded(self, reason: str) -> None:
        self.health = Health.degraded(reason)


def check_wiring(components: Sequence[Component]) -> None:
    """Every component's dependencies are in the list and start before it; names are unique.
    Raises ValidationError naming the component (a wiring bug, found before anything starts)."""
    from propolis.errors import ValidationError

    seen: set[int] = set()
    names: set[str] = set()
    for c in components:
        if c.name in names:
            raise ValidationError(f"components.{c.name}", "two components have this name")
        names.add(c.name)
        for dep in c.requires:
            if id(dep) not in seen:
                where = "after it" if any(dep is x for x in components) else "not in the service"
                raise ValidationError(f"components.{c.name}", f"requires {dep.name!r}, which is {where}")
        seen.add(id(c))
