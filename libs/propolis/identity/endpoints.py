"""A pod's endpoint record: its addresses, node, named ports and identity."""

from __future__ import annotations

from propolis.bus.messages import EndpointRecord, K8sObject


def named_ports(pod: K8sObject) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    for container in pod.fields.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name"):
                out[port["name"]] = [port.get("protocol") or "TCP", int(port["containerPort"])]
    return out


def endpoint_for_pod(pod: K8sObject, identity: int, labels: list[str]) -> EndpointRecord:
    ips = list(pod.status.get("podIPs") or []) or ([pod.status["podIP"]] if pod.status.get("podIP") else [])
    return EndpointRecord(namespace=pod.namespace, name=pod.name, node=pod.fields.get("nodeName", ""),
                          ips=ips, identity=identity, labels=labels, named_ports=named_ports(pod),
                          service_account=pod.fields.get("serviceAccountName") or "default")
