"""DesiredState's LB part is incremental: one Service or EndpointSlice event recomputes that Service only,
and what it keeps always equals a full recompute of the same inputs."""

from __future__ import annotations

from propolis.bus import subjects
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import K8sObject, Watermark
from propolis.k8s.kinds import KINDS
from propolis.writer.desired import DesiredState
from propolis.writer.inputs import ClusterInputs

NODE = "n1"
REV = iter(range(10, 10**9))


def put(inputs: ClusterInputs, plural: str, obj: dict) -> K8sObject:  # type: ignore[type-arg]
    """Through the k8s watch as the writer gets it: the object, then a watermark that releases it."""
    meta = obj.setdefault("metadata", {})
    meta.setdefault("uid", "u-" + meta["name"])
    meta["resourceVersion"] = str(next(REV))
    record = KINDS[plural].to_record(obj)
    ns = meta.get("namespace")
    key = subjects.k8s_key(plural, ns, meta["name"], node=record.fields.get("nodeName", ""))
    inputs.apply_k8s(KvEvent(EventType.PUT, key, record, int(meta["resourceVersion"])))
    release(inputs)
    return record


def delete(inputs: ClusterInputs, plural: str, ns: str | None, name: str) -> None:
    inputs.apply_k8s(KvEvent(EventType.DELETE, subjects.k8s_key(plural, ns, name), None, next(REV)))
    release(inputs)


def release(inputs: ClusterInputs) -> None:
    rv = next(REV)
    inputs.apply_k8s(KvEvent(EventType.PUT, subjects.WATERMARK_KEY, Watermark(rv, 0.0, "e1"), rv))


def service(inputs: ClusterInputs, i: int, *, svc_type: str = "ClusterIP") -> None:
    port = {"name": "http", "port": 80, "protocol": "TCP", **({"nodePort": 30000 + i} if svc_type == "NodePort" else {})}
    put(inputs, "services", {"metadata": {"name": f"s{i}", "namespace": "ns"},
                             "spec": {"type": svc_type, "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                                      "ports": [port]}})


def endpointslice(inputs: ClusterInputs, i: int, owner: int, backend: str) -> None:
    put(inputs, "endpointslices", {
        "metadata": {"name": f"s{i}-x", "namespace": "ns", "labels": {"kubernetes.io/service-name": f"s{owner}"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [backend], "conditions": {"ready": True}, "nodeName": NODE}]})


def node(inputs: ClusterInputs, ip: str) -> None:
    put(inputs, "nodes", {"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


def synced_inputs(services: int) -> ClusterInputs:
    inputs = ClusterInputs()
    inputs.apply_k8s(KvEvent(EventType.SYNCED))
    release(inputs)
    node(inputs, "172.30.1.1")
    for i in range(services):
        service(inputs, i, svc_type="NodePort" if i % 10 == 0 else "ClusterIP")
        endpointslice(inputs, i, i, f"10.244.{i // 250}.{i % 250 + 1}")
    return inputs


def full(inputs: ClusterInputs) -> dict:  # type: ignore[type-arg]
    fresh = DesiredState(NODE)
    fresh.update(inputs, [])
    return dict(fresh.lb.frontends)


def clusterip(i: int) -> tuple[str, int, str]:
    return (f"10.96.{i // 250}.{i % 250 + 1}", 80, "TCP")


def test_one_service_event_recomputes_and_hands_over_only_that_service():
    inputs = synced_inputs(300)
    desired = DesiredState(NODE)
    desired.update(inputs, [])
    assert len(desired.lb.take_changes()) == 330  # 300 ClusterIPs + 30 NodePorts
    service(inputs, 300)
    endpointslice(inputs, 300, 300, "10.244.9.9")
    assert inputs.services_changed == {("ns", "s300")}
    desired.update(inputs, [])
    assert desired.lb.take_changes() == {clusterip(300)} and not inputs.services_changed
    delete(inputs, "services", "ns", "s300")
    desired.update(inputs, [])
    assert desired.lb.take_changes() == {clusterip(300)} and clusterip(300) not in desired.lb.frontends
    assert desired.lb.frontends == full(inputs)


def test_a_slice_moving_to_another_service_changes_both():
    inputs = synced_inputs(20)
    desired = DesiredState(NODE)
    desired.update(inputs, [])
    desired.lb.take_changes()
    endpointslice(inputs, 5, 6, "10.244.0.6")  # slice s5-x now labelled for s6
    assert inputs.services_changed == {("ns", "s5"), ("ns", "s6")}
    desired.update(inputs, [])
    assert desired.lb.take_changes() == {clusterip(5), clusterip(6)}
    assert desired.lb.frontends[clusterip(5)].backends == ()
    assert {b.ip for b in desired.lb.frontends[clusterip(6)].backends} == {"10.244.0.6", "10.244.0.7"}
    assert desired.lb.frontends == full(inputs)


def test_a_node_address_change_moves_the_node_ports_and_nothing_else():
    inputs = synced_inputs(40)
    desired = DesiredState(NODE)
    desired.update(inputs, [])
    desired.lb.take_changes()
    node(inputs, "172.30.1.9")
    desired.update(inputs, [])
    changed = desired.lb.take_changes()
    assert changed == {(ip, 30000 + i, "TCP") for ip in ("172.30.1.1", "172.30.1.9") for i in (0, 10, 20, 30)}
    assert desired.lb.frontends == full(inputs)


def test_an_invalid_service_is_reported_until_fixed_and_the_full_recompute_agrees():
    inputs = synced_inputs(10)
    desired = DesiredState(NODE)
    desired.update(inputs, [])
    put(inputs, "services", {"metadata": {"name": "s3", "namespace": "ns"},
                             "spec": {"clusterIP": "10.96.0.4", "sessionAffinity": "ClientIP",
                                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 999999}},
                                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    desired.update(inputs, [])
    assert "timeoutSeconds" in desired.service_errors["ns/s3"] and clusterip(3) not in desired.lb.frontends
    service(inputs, 3)
    desired.update(inputs, [])
    assert "ns/s3" not in desired.service_errors and clusterip(3) in desired.lb.frontends
    before = dict(desired.lb.frontends)
    desired.lb.take_changes()
    desired.recompute_services(inputs)  # the periodic repair: nothing drifted, nothing to write
    assert desired.lb.frontends == before and desired.lb.take_changes() == set()


def test_a_hostport_yields_to_a_node_port_service_and_gets_it_back_when_the_service_goes():
    inputs = synced_inputs(3)
    put(inputs, "pods", {"metadata": {"name": "hp", "namespace": "ns"},
                         "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [
                             {"containerPort": 8080, "hostPort": 30100, "protocol": "TCP"}]}]},
                         "status": {"phase": "Running", "podIP": "10.244.5.5"}})
    desired = DesiredState(NODE)
    desired.update(inputs, [])
    frontend = ("172.30.1.1", 30100, "TCP")
    assert desired.lb.frontends[frontend].frontend_type == "HostPort"
    service(inputs, 100, svc_type="NodePort")  # nodePort 30100: the same frontend
    desired.update(inputs, [])
    assert desired.lb.frontends[frontend].frontend_type == "NodePort"
    assert "is a Service's frontend" in desired.service_errors["Pod ns/hp"]
    delete(inputs, "services", "ns", "s100")
    desired.update(inputs, [])
    assert desired.lb.frontends[frontend].frontend_type == "HostPort" and "Pod ns/hp" not in desired.service_errors
    assert desired.lb.frontends == full(inputs)
