"""Socket LB's settings: never a cgroup by default (on a shared machine the root cgroup is every process), and
the sandbox hands each node's writer its node's cgroup."""

from __future__ import annotations

import pytest

from propolis.errors import ValidationError
from propolis.suite import SUITE_SERVICES, service_env
from propolis.writer.settings import Settings


def test_socket_lb_needs_a_named_cgroup() -> None:
    with pytest.raises(ValidationError, match="cgroup_root"):
        Settings(node_name="n", bpf_lb_sock=True)
    assert Settings(node_name="n", bpf_lb_sock=True, cgroup_root="/sys/fs/cgroup/x").cgroup_root == "/sys/fs/cgroup/x"
    assert Settings(node_name="n").bpf_lb_sock is False  # Cilium's default; the sandbox turns it on


def test_the_sandbox_writer_runs_socket_lb_on_its_node_cgroup() -> None:
    writer = next(s for s in SUITE_SERVICES if s.name == "datapath-writer")
    argv = list(writer.argv)
    assert argv[argv.index("--bpf-lb-sock") + 1] == "true"
    base = {"nats_url": "nats://x", "sandbox": "s", "kubeconfig": "k", "run_dir": "r", "node": "s-worker",
            "node_netns": "pp-s-1", "pin_dir": "p", "datapath_socket": "d"}
    assert service_env({**base, "cgroup": "/sys/fs/cgroup/propolis/s/s-worker"})["PROPOLIS_CGROUP_ROOT"] == \
        "/sys/fs/cgroup/propolis/s/s-worker"
    assert "PROPOLIS_CGROUP_ROOT" not in service_env({**base, "node": ""})
