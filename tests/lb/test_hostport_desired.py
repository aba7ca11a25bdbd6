"""HostPort frontends from Pod records (lb/hostport.py): own node only, node addresses or hostIP, conflicts."""

from __future__ import annotations

from propolis.bus.messages import K8sObject
from propolis.k8s.kinds import norm_pod
from propolis.lb.hostport import desired_hostports, signature

NODE = "n1"
NODE_IP = "172.30.9.1"


def pod(name: str, *, node: str = NODE, ip: str = "10.244.1.5", host_port: int = 8081, host_ip: str = "",
        created: str = "2026-01-01T00:00:00Z", rv: str = "10", protocol: str = "TCP") -> K8sObject:
    port = {"containerPort": 8080, "protocol": protocol, "hostPort": host_port}
    if host_ip:
        port["hostIP"] = host_ip
    raw = {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
           "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [port]}]},
           "status": {"phase": "Running", "podIP": ip}}
    spec, status = norm_pod(raw)
    return K8sObject("Pod", "ns", name, "uid-" + name, rv, {}, spec, status)


def test_frontend_per_node_address_backend_is_the_pod():
    out = desired_hostports([pod("a")], node_name=NODE, node_ips=[NODE_IP])
    (svc,) = out.services
    assert (svc.frontend_type, svc.frontend) == ("HostPort", (NODE_IP, 8081, "TCP"))
    assert [(b.ip, b.port) for b in svc.backends] == [("10.244.1.5", 8080)]
    assert out.conflicts == {}


def test_other_nodes_pods_and_pods_without_ip_get_none():
    assert desired_hostports([pod("a", node="n2"), pod("b", ip="")], node_name=NODE, node_ips=[NODE_IP]).services == []


def test_host_ip_is_the_frontend():
    (svc,) = desired_hostports([pod("a", host_ip="172.30.9.77")], node_name=NODE, node_ips=[NODE_IP]).services
    assert svc.ip == "172.30.9.77"


def test_later_pod_is_reported_and_holder_is_sticky():
    a = pod("a", ip="10.244.1.5", created="2026-01-01T00:00:01Z")
    b = pod("b", ip="10.244.1.6", created="2026-01-01T00:00:02Z")
    out = desired_hostports([b, a], node_name=NODE, node_ips=[NODE_IP])
    assert [s.backends[0].ip for s in out.services] == ["10.244.1.5"]
    assert "Pod ns/b" in out.conflicts and "ns/a" in out.conflicts["Pod ns/b"]
    # a holder keeps its port even if the other pod sorts first
    out2 = desired_hostports([a, b], node_name=NODE, node_ips=[NODE_IP], owners={(NODE_IP, 8081, "TCP"): ("ns", "b")})
    assert [s.backends[0].ip for s in out2.services] == ["10.244.1.6"] and "Pod ns/a" in out2.conflicts
    # other protocol: no conflict
    out3 = desired_hostports([a, pod("c", protocol="UDP")], node_name=NODE, node_ips=[NODE_IP])
    assert len(out3.services) == 2 and out3.conflicts == {}


def test_service_frontend_wins():
    out = desired_hostports([pod("a")], node_name=NODE, node_ips=[NODE_IP], taken=[(NODE_IP, 8081, "TCP")])
    assert out.services == [] and "Pod ns/a" in out.conflicts


def test_signature_ignores_unrelated_changes():
    a = pod("a")
    assert signature(pod("a", rv="11")) == signature(a)
    assert signature(pod("a", ip="10.244.1.9")) != signature(a)
    assert signature(None) == ()
