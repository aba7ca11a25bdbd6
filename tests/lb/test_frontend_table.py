"""FrontendTable: one owner's frontends replaced alone; the first claimant keeps a shared frontend."""

from __future__ import annotations

from propolis.lb.desired import Backend, LBService
from propolis.lb.frontends import HOSTPORTS, FrontendTable, service_owner


def svc(ns: str, name: str, ip: str, port: int = 80, backend: str = "10.0.0.1", ftype: str = "ClusterIP") -> LBService:
    return LBService(ns, name, "http", ftype, ip, port, "TCP", (Backend(backend, 8080),))


def test_one_owner_changes_only_its_frontends():
    table = FrontendTable()
    table.replace_all({service_owner("a", str(i)): [svc("a", str(i), f"10.96.0.{i}")] for i in range(1, 50)})
    assert len(table.take_changes()) == 49
    table.assign(service_owner("a", "7"), [svc("a", "7", "10.96.0.7", backend="10.0.0.2")])
    table.assign(service_owner("a", "60"), [svc("a", "60", "10.96.0.60")])
    table.assign(service_owner("a", "8"), [])
    assert table.take_changes() == {("10.96.0.7", 80, "TCP"), ("10.96.0.60", 80, "TCP"), ("10.96.0.8", 80, "TCP")}
    assert table.frontends[("10.96.0.7", 80, "TCP")].backends[0].ip == "10.0.0.2"
    assert ("10.96.0.8", 80, "TCP") not in table.frontends
    table.assign(service_owner("a", "9"), [svc("a", "9", "10.96.0.9")])  # the same entry again
    assert table.take_changes() == set()


def test_a_shared_frontend_goes_to_the_first_service_then_to_the_next_when_it_leaves():
    table = FrontendTable()
    shared = ("192.0.2.1", 80, "TCP")
    table.assign(service_owner("b", "late"), [svc("b", "late", "192.0.2.1", backend="10.0.0.9")])
    table.assign(service_owner("a", "early"), [svc("a", "early", "192.0.2.1", backend="10.0.0.1")])
    assert table.frontends[shared].name == "early"
    table.take_changes()
    table.assign(service_owner("b", "late"), [svc("b", "late", "192.0.2.1", backend="10.0.0.8")])
    assert table.take_changes() == set()  # the loser's change does not touch the maps
    table.assign(service_owner("a", "early"), [])
    assert table.take_changes() == {shared} and table.frontends[shared].backends[0].ip == "10.0.0.8"


def test_hostports_never_take_a_services_frontend():
    table = FrontendTable()
    node_port = ("172.30.1.1", 30080, "TCP")
    table.assign(HOSTPORTS, [svc("p", "pod/host-port/30080", "172.30.1.1", 30080, ftype="HostPort")])
    table.assign(service_owner("z", "web"), [svc("z", "web", "172.30.1.1", 30080, ftype="NodePort")])
    assert table.frontends[node_port].frontend_type == "NodePort"
    table.replace_all({HOSTPORTS: list(table.owned(HOSTPORTS).values())})
    assert table.frontends[node_port].frontend_type == "HostPort"
