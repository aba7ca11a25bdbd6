"""Synthetic datapath events and an enricher fed like the bus feeds it."""

from __future__ import annotations

import time
from typing import Any

from propolis.bus.messages import EndpointRecord, IdentityRecord, K8sObject
from propolis.hubble.flow import Enricher, to_flow
from propolis.maps import events as ev

A_IP, B_IP, WORLD_IP = "10.244.1.10", "10.244.2.20", "8.8.8.8"
SVC_IP = "10.96.0.10"


def make_event(**kw: Any) -> ev.FlowEvent:
    base = dict(type=ev.CILIUM_NOTIFY_TRACE, subtype=0, endpoint_id=102, ifindex=7,
                timestamp_ns=int(time.monotonic() * 1e9), length=60, src_identity=40001, dst_identity=40002,
                protocol=6, direction=1, tcp_flags=0x02, src_ip=A_IP, dst_ip=B_IP, src_port=43210, dst_port=8080,
                verdict=1, match_type=0, trace_reason=1, flags=0, proxy_port=0, drop_reason=0, icmp_type=0,
                icmp_code=0)
    base.update(kw)
    return ev.FlowEvent(**base)


def make_enricher() -> Enricher:
    e = Enricher(cluster_name="test")
    e.identities_event("id.40001", IdentityRecord(40001, ["k8s:app=frontend",
                                                          "k8s:io.kubernetes.pod.namespace=shop"]))
    e.identities_event("id.40002", IdentityRecord(40002, ["k8s:app=backend",
                                                          "k8s:io.kubernetes.pod.namespace=shop"]))
    e.identities_event("endpoints.shop.frontend-7d4b9c6f5d-x2x9q", EndpointRecord(
        "shop", "frontend-7d4b9c6f5d-x2x9q", "n1", [A_IP], 40001,
        ["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=shop"]))
    e.identities_event("endpoints.shop.backend-0", EndpointRecord(
        "shop", "backend-0", "n2", [B_IP], 40002, ["k8s:app=backend", "k8s:io.kubernetes.pod.namespace=shop"]))
    e.k8s_event("services.shop.backend", K8sObject("Service", "shop", "backend", "u1", "1",
                                                   fields={"clusterIP": SVC_IP, "ports": [{"port": 80,
                                                                                         "targetPort": 8080}]}))
    e.k8s_event("endpointslices.shop.backend-abc", K8sObject(
        "EndpointSlice", "shop", "backend-abc", "u2", "1", labels={"kubernetes.io/service-name": "backend"},
        fields={"endpoints": [{"addresses": [B_IP]}], "ports": [{"port": 8080, "protocol": "TCP"}]}))
    return e


def flow(**kw: Any) -> dict[str, Any]:
    node = kw.pop("node", "n2")
    return to_flow(make_event(**kw), node=node, enricher=make_enricher())
