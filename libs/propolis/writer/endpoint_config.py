"""Per-endpoint options, Cilium's `cilium endpoint config` names: what the datapath-writer lets a person change.

Why here: an endpoint's options belong to its node's writer (it owns the endpoint and its map entry), are
kept with the endpoint in the writer's state file, and reach the datapath through the endpoint's policy
(`EndpointPolicy.audit`). Only `PolicyAuditMode` exists so far. The host endpoint (hostFirewall) has
its options in `HostEndpointOptions` (`propolis endpoint config node:NAME …`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from propolis.errors import TemporaryError, ValidationError

if TYPE_CHECKING:
    from propolis.writer.endpoints import LocalEndpoint

POLICY_AUDIT_MODE = "PolicyAuditMode"
OPTIONS = (POLICY_AUDIT_MODE,)
_TRUE, _FALSE = ("enabled", "true", "on"), ("disabled", "false", "off")


def parse_switch(option: str, value: str) -> bool:
    """Cilium's spellings of an on/off option value."""
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValidationError(option, f"{value!r} is not Enabled or Disabled")


@dataclass
class HostEndpointOptions:
    """The node's own endpoint's options, kept in a file beside the endpoint table so a restart keeps them."""

    path: Path | None
    policy_audit_mode: bool = False

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            self.policy_audit_mode = bool(json.loads(self.path.read_text()).get("policy_audit_mode", False))
        except (ValueError, AttributeError) as exc:
            raise TemporaryError(f"host endpoint options {self.path} unreadable: {exc}") from exc

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"policy_audit_mode": self.policy_audit_mode}))
        os.replace(tmp, self.path)


def apply_options(ep: LocalEndpoint | HostEndpointOptions, options: dict[str, str]) -> bool:
    """Validate every option first, then set them; True when something changed."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValidationError(unknown[0], f"unknown endpoint option (known: {', '.join(OPTIONS)})")
    audit = parse_switch(POLICY_AUDIT_MODE, options[POLICY_AUDIT_MODE]) if POLICY_AUDIT_MODE in options \
        else ep.policy_audit_mode
    changed = audit != ep.policy_audit_mode
    ep.policy_audit_mode = audit
    return changed


def options_of(ep: LocalEndpoint | HostEndpointOptions) -> dict[str, str]:
    return {POLICY_AUDIT_MODE: "Enabled" if ep.policy_audit_mode else "Disabled"}
