"""The control-plane pieces the sandbox API plays in-process: Service IP/port allocation, pod update
rules, and the EndpointSlice controller.

Why in the API process: on a real cluster kube-apiserver allocates ClusterIPs
and NodePorts at admission, and kube-controller-manager's endpointslice
controller turns Service selectors + ready pod IPs into EndpointSlices. The
sandbox has neither, and Propolis' load balancing reads exactly those
objects, so they are produced here with upstream's rules: endpoints carry
ready/serving/terminating, nodeName and targetRef; a named targetPort is
resolved per pod, and pods that resolve it to different numbers land in
different slices. Inspect with `kubectl get endpointslices -A -o yaml` or
`propolis sandbox get endpointslices`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from propolis.errors import ValidationError
from propolis_sandbox.api_resources import BY_KIND, Resource
from propolis_sandbox.api_selectors import selector_from_map
from propolis_sandbox.api_store import Admission, ApiStatusError, Store, WatchEvent, unprocessable

log = logging.getLogger("propolis_sandbox.api.controllers")

Obj = dict[str, Any]
NODE_PORT_RANGE = (30000, 32767)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
MAX_ENDPOINTS_PER_SLICE = 100


class ServiceAllocator(Admission):
    """ClusterIPs from the service CIDR and NodePorts from 30000-32767, derived from the stored Services
    (no separate bitmap, so a refused or dry-run create never leaks an address)."""

    def __init__(self, store: Store, service_cidr: str = "10.96.0.0/16") -> None:
        self.store = store
        self.network = ipaddress.ip_network(service_cidr, strict=False)
        self.services = BY_KIND["Service"]

    def _used(self, skip_uid: str = "") -> tuple[set[str], set[int]]:
        ips: set[str] = set()
        ports: set[int] = set()
        for svc in self.store.stored(self.services):
            if skip_uid and svc["metadata"].get("uid") == skip_uid:
                continue
            spec = svc.get("spec") or {}
            if spec.get("clusterIP") not in (None, "", "None"):
                ips.add(spec["clusterIP"])
            ports.update(p["nodePort"] for p in spec.get("ports") or [] if p.get("nodePort"))
        return ips, ports

    def _refuse(self, obj: Obj, path: str, value: Any, message: str) -> ApiStatusError:
        shown = f'"{value}"' if isinstance(value, str) else str(value)
        return unprocessable(self.services, obj["metadata"].get("name", ""),
                             [ValidationError(path, f"Invalid value: {shown}: {message}")])

    def _assign(self, obj: Obj, old: Obj | None) -> None:
        spec = obj.setdefault("spec", {})
        old_spec = (old or {}).get("spec") or {}
        ips, node_ports = self._used(skip_uid=(old or {}).get("metadata", {}).get("uid", ""))
        if spec.get("type") == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        else:
            wanted = spec.get("clusterIP") or (spec.get("clusterIPs") or [""])[0]
            if old is not None and old_spec.get("clusterIP"):
                if wanted and wanted != old_spec["clusterIP"]:
                    raise self._refuse(obj, "spec.clusterIP", wanted, "field is immutable")
                wanted = old_spec["clusterIP"]
            elif wanted and wanted != "None":
                try:
                    address = ipaddress.ip_address(wanted)
                except ValueError:
                    raise self._refuse(obj, "spec.clusterIP", wanted, "must be a valid IP address") from None
                if address not in self.network or address in (self.network.network_address,
                                                              self.network.broadcast_address):
                    raise self._refuse(obj, "spec.clusterIP", wanted, "provided IP is not in the valid range. The "
                                                                      f"range of valid IPs is {self.network}")
                if wanted in ips:
                    raise self._refuse(obj, "spec.clusterIP", wanted, "provided IP is already allocated")
            elif not wanted:
                wanted = self._free_ip(ips, obj)
            spec["clusterIP"] = wanted
            spec["clusterIPs"] = [wanted]
        old_node_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                          for p in old_spec.get("ports") or [] if p.get("nodePort")}
        wants_node_ports = spec.get("type") in ("NodePort", "LoadBalancer")
        for i, port in enumerate(spec.get("ports") or []):
            if not wants_node_ports:
                port.pop("nodePort", None)
                continue
            explicit = port.get("nodePort")
            if explicit:
                if not NODE_PORT_RANGE[0] <= explicit <= NODE_PORT_RANGE[1]:
                    raise self._refuse(obj, f"spec.ports[{i}].nodePort", explicit,
                                       f"provided port is not in the valid range. The range of valid ports is "
                                       f"{NODE_PORT_RANGE[0]}-{NODE_PORT_RANGE[1]}")
                if explicit in node_ports:
                    raise self._refuse(obj, f"spec.ports[{i}].nodePort", explicit, "provided port is already allocated")
            else:
                explicit = old_node_ports.get((port.get("port"), port.get("protocol", "TCP"))) or \
                    self._free_port(node_ports, obj, i)
                port["nodePort"] = explicit
            node_ports.add(explicit)

    def _free_ip(self, used: set[str], obj: Obj) -> str:
        for address in self.network.hosts():
            if str(address) not in used:
                return str(address)
        raise ApiStatusError(500, "InternalError", f"Internal error occurred: failed to allocate a serviceIP: range "
                                                   f"{self.network} is full")

    def _free_port(self, used: set[int], obj: Obj, index: int) -> int:
        for port in range(NODE_PORT_RANGE[0], NODE_PORT_RANGE[1] + 1):
            if port not in used:
                return port
        raise self._refuse(obj, f"spec.ports[{index}].nodePort", 0, "range of node ports is full")

    def on_create(self, resource: Resource, obj: Obj) -> None:
        if resource is self.services:
            self._assign(obj, None)
            obj["status"] = {"loadBalancer": {}}

    def on_update(self, resource: Resource, old: Obj, new: Obj) -> None:
        if resource is self.services:
            self._assign(new, old)


def _without_images(containers: list[Obj] | None) -> list[Obj]:
    """Containers as far as a pod update may not change them (the image may change)."""
    return [{k: v for k, v in c.items() if k != "image"} for c in containers or []]


class PodUpdateRules(Admission):
    """Pods are nearly immutable: an update may bind an unbound pod (spec.nodeName) or change images,
    activeDeadlineSeconds and tolerations, nothing else in spec (as kube-apiserver)."""

    MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")

    def on_update(self, resource: Resource, old: Obj, new: Obj) -> None:
        if resource.kind != "Pod":
            return
        old_spec, new_spec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
        if not old_spec.get("nodeName") and new_spec.get("nodeName"):
            old_spec["nodeName"] = new_spec["nodeName"]
        for key in self.MUTABLE:
            old_spec.pop(key, None)
            new_spec.pop(key, None)
        old_spec["containers"] = _without_images(old_spec.get("containers"))
        new_spec["containers"] = _without_images(new_spec.get("containers"))
        if old_spec != new_spec:
            changed = sorted(k for k in set(old_spec) | set(new_spec) if old_spec.get(k) != new_spec.get(k))
            raise unprocessable(resource, new["metadata"]["name"], [ValidationError(
                "spec", "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                        "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), "
                        f"`spec.terminationGracePeriodSeconds` (changed: {', '.join('spec.' + c for c in changed)})")])


def _pod_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _resolve_target_port(pod: Obj, target: Any, protocol: str) -> int | None:
    """A numbered targetPort as is; a named one from the pod's containerPorts (None when the pod lacks it)."""
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return int(port["containerPort"])
    return None


def desired_slices(service: Obj, pods: list[Obj]) -> list[tuple[list[Obj], list[Obj]]]:
    """[(ports, endpoints)] for a Service: one group per distinct resolved port set, as upstream groups them."""
    spec = service.get("spec") or {}
    selector = selector_from_map(spec.get("selector") or {})
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[str, tuple[list[Obj], list[Obj]]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta, status = pod["metadata"], pod.get("status") or {}
        if not selector.matches(meta.get("labels")) or not status.get("podIP"):
            continue
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        terminating = bool(meta.get("deletionTimestamp"))
        ports = []
        for sp in spec.get("ports") or []:
            protocol = sp.get("protocol", "TCP")
            number = _resolve_target_port(pod, sp.get("targetPort", sp.get("port")), protocol)
            if number is None:
                continue
            entry: Obj = {"name": sp.get("name", ""), "port": number, "protocol": protocol}
            if sp.get("appProtocol"):
                entry["appProtocol"] = sp["appProtocol"]
            ports.append(entry)
        ready = _pod_ready(pod)
        endpoint: Obj = {
            "addresses": [status["podIP"]],
            "conditions": {"ready": (ready or publish_not_ready) and not terminating,
                           "serving": ready or publish_not_ready, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid")},
        }
        if (pod.get("spec") or {}).get("nodeName"):
            endpoint["nodeName"] = pod["spec"]["nodeName"]
        key = repr(sorted((p["name"], p["port"], p["protocol"]) for p in ports))
        groups.setdefault(key, (ports, []))[1].append(endpoint)
    out: list[tuple[list[Obj], list[Obj]]] = []
    for ports, endpoints in groups.values():
        for start in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            out.append((ports, endpoints[start:start + MAX_ENDPOINTS_PER_SLICE]))
    return out or [([], [])]  # a Service selecting nothing keeps one empty placeholder slice


class EndpointSliceController:
    """Keeps each selector Service's EndpointSlices equal to `desired_slices` (runs as one named task)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pods, self.services, self.slices = BY_KIND["Pod"], BY_KIND["Service"], BY_KIND["EndpointSlice"]
        self.dirty: set[tuple[str, str]] = set()
        self.wakeup = asyncio.Event()
        self.errors = 0

    def on_event(self, event: WatchEvent) -> None:
        meta = event.obj["metadata"]
        ns = meta.get("namespace", "")
        if event.resource is self.services:
            self.dirty.add((ns, meta["name"]))
        elif event.resource is self.pods:
            self.dirty.update((ns, s["metadata"]["name"]) for s in self._services_in(ns))
        elif event.resource is self.slices:
            labels = meta.get("labels") or {}
            if labels.get(MANAGED_BY_LABEL) == CONTROLLER_NAME and labels.get(SERVICE_NAME_LABEL):
                self.dirty.add((ns, labels[SERVICE_NAME_LABEL]))
        else:
            return
        self.wakeup.set()

    def _services_in(self, ns: str) -> list[Obj]:
        return self.store.stored(self.services, ns)

    async def run(self) -> None:
        self.store.hooks.append(self.on_event)
        for svc in self.store.all_objects(self.services):
            self.dirty.add((svc["metadata"]["namespace"], svc["metadata"]["name"]))
        if self.dirty:
            self.wakeup.set()  # a store loaded from disk: a change may have been killed before its slices followed
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while self.dirty:
                    ns, name = self.dirty.pop()
                    try:
                        self.sync(ns, name)
                    except ApiStatusError as exc:
                        self.errors += 1
                        log.warning("endpointslices for service %s/%s: %s", ns, name, exc.message)
                await asyncio.sleep(0)
        finally:
            self.store.hooks.remove(self.on_event)

    def _owned_slices(self, ns: str, name: str) -> list[Obj]:
        return sorted((s for s in self.store.all_objects(self.slices)
                       if s["metadata"].get("namespace") == ns
                       and (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == name
                       and (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == CONTROLLER_NAME),
                      key=lambda s: s["metadata"]["name"])

    def sync(self, ns: str, name: str) -> None:
        """Reconcile one Service's slices; idempotent (no write when nothing differs)."""
        service = self.store.find(self.services, ns, name)
        existing = self._owned_slices(ns, name)
        spec = (service or {}).get("spec") or {}
        if service is None or spec.get("selector") is None or spec.get("type") == "ExternalName":
            for s in existing:
                self.store.delete(self.slices, ns, s["metadata"]["name"])
            return
        pods = self.store.stored(self.pods, ns)
        wanted = desired_slices(service, pods)
        unmatched = list(existing)
        for ports, endpoints in wanted:
            match = next((s for s in unmatched if (s.get("ports") or []) == ports), None) or \
                (unmatched[0] if unmatched else None)
            body = self._slice_body(service, ports, endpoints, match)
            if match is None:
                self.store.create(self.slices, ns, body)
            else:
                unmatched.remove(match)
                if any(match.get(k) != body.get(k) for k in ("ports", "endpoints", "addressType")) or \
                        match["metadata"].get("labels") != body["metadata"]["labels"]:
                    self.store.update(self.slices, ns, match["metadata"]["name"], body)
        for s in unmatched:
            self.store.delete(self.slices, ns, s["metadata"]["name"])

    def _slice_body(self, service: Obj, ports: list[Obj], endpoints: list[Obj], current: Obj | None) -> Obj:
        meta = service["metadata"]
        labels = {k: v for k, v in (meta.get("labels") or {}).items()}
        labels.update({SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: CONTROLLER_NAME})
        slice_meta: Obj = {"namespace": meta["namespace"], "labels": labels,
                           "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                                "uid": meta.get("uid"), "controller": True,
                                                "blockOwnerDeletion": True}]}
        if current is None:
            slice_meta["generateName"] = meta["name"] + "-"
        else:
            slice_meta = {**current["metadata"], **slice_meta}
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": slice_meta,
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports}
