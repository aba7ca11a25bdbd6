"""A service is a list of components with a lifecycle (like cilium/hive).

A component has a name, a one-line title, and start/stop. Constructors do no
I/O. The runtime starts components in list order and stops them in reverse —
only those that started. Long-running work is spawned with `Runtime.spawn`
so a task that dies is logged, turns its component Failed (sticky: no later
`set_ok` erases it) and ends the process non-zero for its supervisor to restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from propolis.runtime.health import Health

if TYPE_CHECKING:
    from propolis.runtime.service import Runtime


class Component:
    name: str = "component"
    title: str = ""

    def __init__(self) -> None:
        self._health: Health = Health.stopped("not started")
        self.failure = ""  # set by the runtime when a guarded task of this component died

    @property
    def health(self) -> Health:
        """What the component says, unless one of its tasks died: that wins until the process exits."""
        return Health.failed(self.failure) if self.failure else self._health

    @health.setter
    def health(self, value: Health) -> None:
        self._health = value

    async def start(self, rt: "Runtime") -> None:
        """Acquire resources and spawn tasks; return once the component can serve."""

    async def stop(self) -> None:
        """Release what start acquired; tasks spawned with rt.spawn are cancelled by the runtime."""

    def set_ok(self, reason: str = "") -> None:
        self.health = Health.ok(reason)

    def set_degraded(self, reason: str) -> None:
        self.health = Health.degraded(reason)
