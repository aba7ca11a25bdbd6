"""Validation of mirrored objects before they reach the bus (policies: the cilium.io/v2 schema).

Raises propolis.errors.ValidationError naming the field; the mirror keeps the
last valid version in force.
"""

from __future__ import annotations

from typing import Any

from propolis.k8s.kinds import Kind


def validate_object(kind: Kind, obj: dict[str, Any]) -> None:
    from propolis.policy import parse  # the policy package owns the schema

    parse.parse_policy_object(kind.kind, obj)
