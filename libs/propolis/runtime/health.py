"""Health is OK / Degraded(reason) / Stopped / Failed(reason) per component; the service's health is the worst.

Failed means a guarded task died: the process is about to exit non-zero so its supervisor restarts it
(nothing stays degraded forever). `/readyz`, `/healthz`, the heartbeat and `propolis status` all read
this one model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.IntEnum):
    OK = 0
    DEGRADED = 1
    STOPPED = 2
    FAILED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Health:
    state: State = State.STOPPED
    reason: str = ""

    @classmethod
    def ok(cls, reason: str = "") -> Health:
        return cls(State.OK, reason)

    @classmethod
    def degraded(cls, reason: str) -> Health:
        return cls(State.DEGRADED, reason)

    @classmethod
    def stopped(cls, reason: str = "") -> Health:
        return cls(State.STOPPED, reason)

    @classmethod
    def failed(cls, reason: str) -> Health:
        return cls(State.FAILED, reason)

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state.label, "reason": self.reason}


def worst(healths: list[Health]) -> State:
    return max((h.state for h in healths), default=State.OK)
