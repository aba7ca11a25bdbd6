"""Each local endpoint's state as `cilium endpoint list` shows it, published in the writer's heartbeat.

Why: a policy that cannot be enforced for one endpoint (more rows than its map holds) leaves that
endpoint on its last enforced state; a person must see which endpoint, on which node, and why —
and whether a change is still being written. The datapath-writer puts `endpoint_states(...)` in
its heartbeat progress (``endpoint_states``: "ns/pod" -> `EndpointState` fields);
`propolis endpoint list` joins it with the identities bucket.

States (Cilium's names): ``ready`` — the desired policy is in the kernel; ``regenerating`` — a
change is computed and not yet written; ``not-ready`` — with the reason (no identity yet, the
policy could not be computed, or writing it failed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from propolis.reconcile import ObjectStatus, Status

if TYPE_CHECKING:
    from propolis.policy.engine import PolicyEngine
    from propolis.writer.endpoints import LocalEndpoint
    from propolis.writer.targets import EndpointPolicy

PROGRESS_KEY = "endpoint_states"
READY, REGENERATING, NOT_READY = "ready", "regenerating", "not-ready"


@dataclass(frozen=True)
class EndpointState:
    id: int
    identity: int
    state: str
    reason: str = ""
    ingress: bool = False  # policy enforcement per direction (Cilium: Enabled / Disabled)
    egress: bool = False
    audit: bool = False  # policy audit mode: would-be drops forwarded and reported (Cilium: "Disabled (Audit)")


def endpoint_state(ep: LocalEndpoint, policy: EndpointPolicy | None, status: ObjectStatus | None,
                   compute_error: str | None) -> EndpointState:
    def state(name: str, reason: str = "") -> EndpointState:
        return EndpointState(ep.endpoint_id, ep.identity, name, reason,
                             bool(policy and policy.ingress_enforced), bool(policy and policy.egress_enforced),
                             bool(policy and policy.audit))

    if not ep.identity:
        return state(NOT_READY, "waiting for the pod's identity (deny-all meanwhile)")
    if compute_error:
        return state(NOT_READY, f"policy not computed, last enforced state kept: {compute_error}")
    if status is not None and status.status in (Status.ERROR, Status.FAILED):
        kept = "last enforced state kept" + ("; retrying" if status.status is Status.ERROR else "")
        return state(NOT_READY, f"{status.error} ({kept})")
    if policy is None or status is None or status.status is Status.PENDING:
        return state(REGENERATING)
    return state(READY)


def endpoint_states(endpoints: Iterable[LocalEndpoint], policies: Mapping[int, EndpointPolicy],
                    statuses: Mapping[int, ObjectStatus], compute_errors: Mapping[int, str]) -> dict[str, Any]:
    """"ns/pod" -> the endpoint's state as plain fields (the heartbeat's progress is msgpack)."""
    return {f"{ep.namespace}/{ep.pod}": asdict(endpoint_state(ep, policies.get(ep.endpoint_id),
                                                              statuses.get(ep.endpoint_id),
                                                              compute_errors.get(ep.endpoint_id)))
            for ep in sorted(endpoints, key=lambda e: (e.namespace, e.pod))}


def policy_failures(endpoints: Iterable[LocalEndpoint], engine: PolicyEngine,
                    failed: Mapping[int, str]) -> dict[str, dict[str, str]]:
    """Policy origin -> "ns/pod" -> why, for each failed endpoint and every policy selecting it (the
    k8s-watcher writes it onto those policies' status as ``Enforced`` False)."""
    out: dict[str, dict[str, str]] = {}
    for ep in endpoints:
        why = failed.get(ep.endpoint_id)
        if why is None or not ep.identity:
            continue
        for origin in sorted({r.origin for r in engine.rules_selecting(ep.identity)}):
            out.setdefault(origin, {})[f"{ep.namespace}/{ep.pod}"] = why
    return out
