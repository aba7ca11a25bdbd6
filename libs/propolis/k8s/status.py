"""Writing a policy's validity back to its status subresource, like Cilium's policy status."""

from __future__ import annotations

import time
from typing import Any

import orjson

from propolis.errors import ValidationError
from propolis.k8s.kinds import Kind
from propolis.k8s.kubeclient import ApiClient


def valid_condition(error: ValidationError | None) -> dict[str, Any]:
    return {
        "type": "Valid",
        "status": "False" if error else "True",
        "reason": "InvalidPolicy" if error else "ValidPolicy",
        "message": str(error) if error else "Policy validation succeeded",
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def patch_policy_status(api: ApiClient, kind: Kind, obj: dict[str, Any], error: ValidationError | None) -> None:
    """Merge-patch ``status.conditions`` with a Valid condition (CRDs only; NetworkPolicy has none)."""
    if kind.api_version != "cilium.io/v2":
        return
    meta = obj.get("metadata") or {}
    group, version = kind.group_version
    ns = f"/namespaces/{meta['namespace']}" if kind.namespaced else ""
    path = f"/apis/{group}/{version}{ns}/{kind.plural}/{meta['name']}/status"
    body = {"status": {"conditions": [valid_condition(error)]}}
    resp = await api.call_api(path, "PATCH", header_params={"Content-Type": "application/merge-patch+json"},
                              body=orjson.loads(orjson.dumps(body)), auth_settings=["BearerToken"],
                              _preload_content=False, _return_http_data_only=True, _request_timeout=10)
    resp.release()
