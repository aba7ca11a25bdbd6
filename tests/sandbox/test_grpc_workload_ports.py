"""Which pod ports the sandbox serves gRPC on: TCP ports whose name starts with `grpc` (the rest stay echo)."""

from __future__ import annotations

from propolis.sandbox.kubelet import container_ports, grpc_ports


def test_tcp_ports_named_grpc_serve_grpc_the_others_echo():
    pod = {"spec": {"containers": [
        {"name": "a", "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 50051}]},
        {"name": "b", "ports": [{"name": "grpc-web", "containerPort": 9000},
                                {"name": "grpc-dns", "containerPort": 53, "protocol": "UDP"},
                                {"containerPort": 7000}]}]}}
    assert grpc_ports(pod) == [9000, 50051]
    assert container_ports(pod) == ([7000, 8080, 9000, 50051], [53])
    assert grpc_ports({"spec": {}}) == []
