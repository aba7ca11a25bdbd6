"""The one set of validators for Kubernetes objects Propolis acts on (labels; policies: the cilium.io/v2 schema).

Why one set: the sandbox API refuses what these refuse (422, naming the field)
and the k8s-watcher refuses the same before anything reaches the bus (keeping
the last valid version in force), so the API can never accept a policy the
watcher later drops — a new isolation policy that silently does nothing.
Raises (or lists) propolis.errors.ValidationError naming the field.
"""

from __future__ import annotations

from typing import Any

from propolis.errors import ValidationError
from propolis.k8s.kinds import Kind
from propolis.model.labels import kubernetes_label_errors

POLICY_KIND_NAMES = frozenset({"NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"})


def label_errors(obj: dict[str, Any]) -> list[ValidationError]:
    """`metadata.labels` against Kubernetes' rules (63-character values, qualified keys)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return kubernetes_label_errors(labels) if labels is not None else []


def policy_errors(kind: str, obj: dict[str, Any]) -> list[ValidationError]:
    """A policy's spec/specs through the policy package's parser (the form the compiler reads)."""
    if kind not in POLICY_KIND_NAMES:
        return []
    from propolis.policy import parse  # the policy package owns the schema

    try:
        parse.parse_policy_object(kind, obj)
    except ValidationError as exc:
        return [exc]
    return []


def object_errors(kind: str, obj: dict[str, Any]) -> list[ValidationError]:
    """Every problem this set finds in an object of `kind` (a Kind's name: "Pod", "NetworkPolicy"…)."""
    return label_errors(obj) + policy_errors(kind, obj)


def validate_object(kind: Kind | str, obj: dict[str, Any]) -> None:
    """Raise the first problem (the k8s-watcher's gate before the bus)."""
    errors = object_errors(kind if isinstance(kind, str) else kind.kind, obj)
    if errors:
        raise errors[0]
