"""Which pod ports the sandbox serves gRPC on: TCP ports whose name starts with `grpc` (the rest stay echo);
what a gRPC probe must name."""

from __future__ import annotations

import pytest

from propolis.errors import ValidationError
from propolis_sandbox.kubelet import container_ports, grpc_ports
from propolis_sandbox.probe import ProbeSpec


def test_tcp_ports_named_grpc_serve_grpc_the_others_echo():
    pod = {"spec": {"containers": [
        {"name": "a", "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 50051}]},
        {"name": "b", "ports": [{"name": "grpc-web", "containerPort": 9000},
                                {"name": "grpc-dns", "containerPort": 53, "protocol": "UDP"},
                                {"containerPort": 7000}]}]}}
    assert grpc_ports(pod) == [9000, 50051]
    assert container_ports(pod) == ([7000, 8080, 9000, 50051], [53])
    assert grpc_ports({"spec": {}}) == []


@pytest.mark.parametrize("spec", [{"grpc": "Health/Check"}, {"grpc": "/a.B/C", "protocol": "UDP"},
                                  {"grpc": "/a.B/C", "http": ("GET", "/")}])
def test_a_grpc_probe_is_one_tcp_call_named_by_its_path(spec):
    with pytest.raises(ValidationError) as err:
        ProbeSpec("pod-netns", "10.0.0.1", 50051, **spec)
    assert err.value.field == "grpc"
    assert ProbeSpec("pod-netns", "10.0.0.1", 50051, grpc="/a.B/C").grpc == "/a.B/C"
