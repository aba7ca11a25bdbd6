"""Cluster Mesh in the LB maps: each backend's cluster id in cilium_lb4_backends_v3 and a global Service's
affinity on its master entry, so `propolis service list` marks remote and preferred backends from the maps."""

from __future__ import annotations

import json

import pytest

from propolis.bus.messages import ClusterService, K8sObject
from propolis.cli.main import main
from propolis.clustermesh import imported
from propolis.lb.desired import desired_services
from propolis.maps import lb as lbmaps

pytestmark = pytest.mark.root

LOCAL, REMOTE = "10.244.1.20", "10.245.1.20"


def global_api(affinity: str, local_backend: bool = True) -> list:
    """The node's LB entries of a global Service with one local backend (if any) and one of cluster 2."""
    svc = K8sObject("Service", "ns", "api", "uid", "1", fields={
        "clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}})
    local = K8sObject("EndpointSlice", "ns", "api-x", "uid", "1", labels={"kubernetes.io/service-name": "api"},
                      fields={"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                            "endpoints": [{"addresses": [LOCAL], "nodeName": "n1"}] if local_backend else []})
    remote = {("ns", "api"): {"c2": ClusterService("c2", "ns", "api", True, {"http/TCP": [[REMOTE, 8080]]}, 2)}}
    return desired_services([svc], [local], node_name="n1",
                            remote_backends=imported.remote_backends(remote, ("ns", "api")))


def listed(pin: str, capsys) -> dict[str, dict]:
    assert main(["service", "list", "--pin-dir", pin, "-o", "json"]) == 0
    views = json.loads(capsys.readouterr().out)
    return {b["address"].split(":")[0]: b for v in views for b in v["backends"]}


@pytest.mark.parametrize("affinity,local_backend,in_use,preferred", [
    ("none", True, {LOCAL, REMOTE}, set()),
    ("local", True, {LOCAL}, {LOCAL}),
    ("remote", True, {REMOTE}, {REMOTE}),
    ("local", False, {REMOTE}, set()),  # failover: the remote side is used, it is not the preferred one
])
def test_service_list_marks_remote_and_preferred_backends(harness, capsys, affinity, local_backend, in_use,
                                                          preferred):
    dp = harness.dp
    dp._services = None
    try:
        dp.set_services(global_api(affinity, local_backend))
        backends = listed(dp.pin_dir, capsys)
        assert set(backends) == in_use
        for ip, b in backends.items():
            assert (b["cluster_id"], b["remote"], b["preferred"]) == (2 if ip == REMOTE else 0, ip == REMOTE,
                                                                      ip in preferred), b
        stored = lbmaps.dump_backends(dp._map(lbmaps.BACKENDS_SPEC.pin_name))
        assert {ip: cluster for ip, _port, _proto, _state, cluster in stored.values()} == \
            {ip: 2 if ip == REMOTE else 0 for ip in in_use}
        assert main(["service", "list", "--pin-dir", dp.pin_dir]) == 0
        table = capsys.readouterr().out
        if REMOTE in in_use:
            mark = " (preferred)" if REMOTE in preferred else ""
            assert f"=> {REMOTE}:8080/TCP (active) (remote: cluster 2){mark}\n" in table, table
        if LOCAL in in_use:
            mark = " (preferred)" if LOCAL in preferred else ""
            assert f"=> {LOCAL}:8080/TCP (active){mark}\n" in table, table
    finally:
        dp.set_services([])
