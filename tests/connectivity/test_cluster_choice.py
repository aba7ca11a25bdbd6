"""How `propolis connectivity test` finds its cluster: the sandbox through the `propolis.clusters` entry
point (the product never imports it), a kubeconfig through kube.py; each refusal names what is missing."""

from __future__ import annotations

import pytest

from propolis.cli.main import main
from propolis.connectivity.cluster import installed_cluster
from propolis.connectivity.kube import manifest_path
from propolis.errors import CliError


def test_the_sandbox_cluster_comes_from_the_entry_point() -> None:
    from propolis_sandbox.connectivity_cluster import open_sandbox
    assert installed_cluster("sandbox") is open_sandbox
    with pytest.raises(CliError, match="no 'nope' cluster installed.*propolis.clusters has sandbox"):
        installed_cluster("nope")


def test_a_missing_kubeconfig_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nats-url", "nats://127.0.0.1:1", "connectivity", "test", "--kubeconfig", "/nonexistent/kc"]) == 1
    assert "--kubeconfig /nonexistent/kc: no such file" in capsys.readouterr().err


def test_manifest_paths_follow_the_kind_table() -> None:
    policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "p", "namespace": "propolis-test"}}
    assert manifest_path(policy, item=False) == "/apis/cilium.io/v2/namespaces/propolis-test/ciliumnetworkpolicies"
    assert manifest_path({"kind": "Namespace", "metadata": {"name": "x"}}, item=True) == "/api/v1/namespaces/x"
    with pytest.raises(CliError, match="kind 'Deployment' is not one the connectivity test writes"):
        manifest_path({"kind": "Deployment", "metadata": {"name": "d"}}, item=False)
