"""Writing a policy's validity back to its status subresource, like Cilium's policy status.

Conditions: ``Valid`` (True/False with the refusal naming the field) and, for a valid policy
with fields Propolis accepts but does not enforce yet (`propolis.policy.unenforced`), a
warning condition ``NotEnforced`` (status True, reason ``FieldsNotEnforced``, the message names
each field and why), and for a policy some node could not enforce (an endpoint it selects
failed: more rows than the policy map holds), ``Enforced`` False (reason ``EnforcementFailed``,
the message names each node, endpoint and why; gone once every node enforces it again). Nodes
report their failures in the datapath-writer heartbeat (``policy_failures``); the k8s-watcher's
leader gathers them (`PolicyFailureReporter`). The status is patched only when the conditions
differ from what the object carries, so the watch event the patch causes does not patch again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from propolis.bus import subjects
from propolis.bus.kv import Kv
from propolis.bus.messages import POLICY_FAILURES_KEY, Heartbeat
from propolis.errors import ValidationError
from propolis.k8s.kinds import KINDS, POLICY_KINDS, Kind
from propolis.k8s.kubeclient import ApiClient

log = logging.getLogger("propolis.k8s.status")
Failures = Mapping[str, Mapping[str, str]]  # node -> endpoint ("ns/pod") -> why

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


def enforcement_failed_condition(failures: Failures) -> dict[str, Any]:
    parts = [f"node {node}: endpoint {ep}: {why}" for node, eps in sorted(failures.items())
             for ep, why in sorted(eps.items())]
    return {"type": "Enforced", "status": "False", "reason": "EnforcementFailed",
            "message": "not enforced, last enforced state kept: " + "; ".join(parts),
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def policy_conditions(obj: dict[str, Any], error: ValidationError | None,
                      failures: Failures | None = None) -> list[dict[str, Any]]:
    """``Valid`` first (readers take conditions[0]), then ``NotEnforced`` when a valid policy has such fields,
    then ``Enforced`` False when some node failed to enforce it."""
    warning = None if error is not None else not_enforced_condition(obj)
    failed = enforcement_failed_condition(failures) if error is None and failures else None
    return [valid_condition(error)] + [c for c in (warning, failed) if c]


def _essence(conditions: Any) -> list[tuple[Any, ...]]:
    return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in conditions or [] if isinstance(c, dict)]


async def patch_policy_status(api: ApiClient, kind: Kind, obj: dict[str, Any], error: ValidationError | None,
                              failures: Failures | None = None) -> None:
    """Merge-patch ``status.conditions`` (CRDs only; NetworkPolicy has none) when they changed."""
    if kind.api_version != "cilium.io/v2" or kind.plural not in POLICY_KINDS:
        return
    conditions = policy_conditions(obj, error, failures)
    if _essence(conditions) == _essence((obj.get("status") or {}).get("conditions")):
        return
    meta = obj.get("metadata") or {}
    path = kind.path(meta.get("namespace", ""), meta["name"]) + "/status"
    body = {"status": {"conditions": conditions}}
    resp = await api.call_api(path, "PATCH", header_params={"Content-Type": "application/merge-patch+json"},
                              body=orjson.loads(orjson.dumps(body)), auth_settings=["BearerToken"],
                              _preload_content=False, _return_http_data_only=True, _request_timeout=10)
    resp.release()


def origin_of(kind: Kind, obj: dict[str, Any]) -> str:
    """The policy's origin as the compiler names it (`Policy.origin`): Kind/namespace/name or Kind/name."""
    meta = obj.get("metadata") or {}
    return f"{kind.kind}/{meta['namespace']}/{meta.get('name')}" if kind.namespaced else f"{kind.kind}/{meta.get('name')}"


def gather_failures(heartbeats: Iterable[Heartbeat]) -> dict[str, dict[str, dict[str, str]]]:
    """Policy origin -> node -> endpoint -> why, from each node's newest datapath-writer heartbeat."""
    newest: dict[str, Heartbeat] = {}
    for hb in heartbeats:
        if hb.service == "datapath-writer" and (hb.node not in newest or hb.sent_at > newest[hb.node].sent_at):
            newest[hb.node] = hb
    out: dict[str, dict[str, dict[str, str]]] = {}
    for node, hb in newest.items():
        reported = hb.progress.get(POLICY_FAILURES_KEY)
        for origin, eps in (reported.items() if isinstance(reported, dict) else ()):
            if isinstance(eps, dict) and eps:
                out.setdefault(str(origin), {})[node] = {str(k): str(v) for k, v in eps.items()}
    return out


class PolicyFailureReporter:
    """The k8s-watcher leader's view of which policies some node failed to enforce, written to each
    policy's status when it changes (and cleared when the node enforces it again)."""

    def __init__(self) -> None:
        self.failures: dict[str, dict[str, dict[str, str]]] = {}

    def for_object(self, kind: Kind, obj: dict[str, Any]) -> Failures | None:
        return self.failures.get(origin_of(kind, obj))

    async def run(self, api: ApiClient, heartbeats: Kv, is_leader: Callable[[], bool], interval: float = 1.0) -> None:
        """The leader's loop: every ``interval``, the datapath-writers' heartbeats -> `step`."""
        while True:
            await asyncio.sleep(interval)
            if not is_leader():
                continue
            try:
                writers = [e.value for e in (await heartbeats.items(subjects.heartbeat_keys("datapath-writer"))).values()
                           if isinstance(e.value, Heartbeat)]
                await self.step(api, writers)
            except Exception as exc:  # noqa: BLE001 - NATS or the API away: the next round retries
                log.warning("policy enforcement status: %s", exc)

    async def step(self, api: ApiClient, heartbeats: Iterable[Heartbeat]) -> list[str]:
        """Take the nodes' latest reports; patch every policy whose failures changed. Returns those origins."""
        now = gather_failures(heartbeats)
        changed = sorted(o for o in set(now) | set(self.failures) if now.get(o) != self.failures.get(o))
        for origin in changed:
            kind_name, _, rest = origin.partition("/")
            kind = next((k for k in KINDS.values() if k.kind == kind_name and k.plural in POLICY_KINDS), None)
            if kind is None or kind.api_version != "cilium.io/v2":
                continue  # a NetworkPolicy has no status: `propolis status` names its failures
            namespace, _, name = rest.rpartition("/") if kind.namespaced else ("", "", rest)
            try:
                resp = await api.call_api(kind.path(namespace, name), "GET", auth_settings=["BearerToken"],
                                          _preload_content=False, _return_http_data_only=True, _request_timeout=10)
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    continue  # deleted meanwhile: nothing to report on
                raise
            try:
                obj = orjson.loads(await resp.read())
            finally:
                resp.release()
            await patch_policy_status(api, kind, obj, None, now.get(origin))
            log.info("policy %s: enforcement failures now %s", origin, now.get(origin) or "none")
        self.failures = now
        return changed
