"""Writing a policy's validity back to its status subresource, like Cilium's policy status.

Conditions: ``Valid`` (True/False with the refusal naming the field) and, for a valid policy
with fields Propolis accepts but does not enforce yet (`propolis.policy.unenforced`), a
warning condition ``NotEnforced`` (status True, reason ``FieldsNotEnforced``, the message names
each field and why). The status is patched only when these differ from what the object
carries, so the watch event the patch causes does not patch again.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from propolis.errors import ValidationError
from propolis.k8s.kinds import POLICY_KINDS, Kind
from propolis.k8s.kubeclient import ApiClient


def valid_condition(error: ValidationError | None) -> dict[str, Any]:
    return {
        "type": "Valid",
        "status": "False" if error else "True",
        "reason": "InvalidPolicy" if error else "ValidPolicy",
        "message": str(error) if error else "Policy validation succeeded",
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


NOT_ENFORCED = "NotEnforced"


def not_enforced_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The warning condition of a valid policy with accepted-but-not-enforced fields (None: all enforced)."""
    from propolis.policy.unenforced import not_enforced

    items = not_enforced(obj)
    if not items:
        return None
    return {"type": NOT_ENFORCED, "status": "True", "reason": "FieldsNotEnforced",
            "message": "accepted, not enforced: " + "; ".join(str(i) for i in items),
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def policy_conditions(obj: dict[str, Any], error: ValidationError | None) -> list[dict[str, Any]]:
    """``Valid`` first (readers take conditions[0]), then ``NotEnforced`` when a valid policy has such fields."""
    warning = None if error is not None else not_enforced_condition(obj)
    return [valid_condition(error)] + ([warning] if warning else [])


def _essence(conditions: Any) -> list[tuple[Any, ...]]:
    return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in conditions or [] if isinstance(c, dict)]


async def patch_policy_status(api: ApiClient, kind: Kind, obj: dict[str, Any], error: ValidationError | None) -> None:
    """Merge-patch ``status.conditions`` (CRDs only; NetworkPolicy has none) when they changed."""
    if kind.api_version != "cilium.io/v2" or kind.plural not in POLICY_KINDS:
        return
    conditions = policy_conditions(obj, error)
    if _essence(conditions) == _essence((obj.get("status") or {}).get("conditions")):
        return
    meta = obj.get("metadata") or {}
    group, version = kind.group_version
    ns = f"/namespaces/{meta['namespace']}" if kind.namespaced else ""
    path = f"/apis/{group}/{version}{ns}/{kind.plural}/{meta['name']}/status"
    body = {"status": {"conditions": conditions}}
    resp = await api.call_api(path, "PATCH", header_params={"Content-Type": "application/merge-patch+json"},
                              body=orjson.loads(orjson.dumps(body)), auth_settings=["BearerToken"],
                              _preload_content=False, _return_http_data_only=True, _request_timeout=10)
    resp.release()
