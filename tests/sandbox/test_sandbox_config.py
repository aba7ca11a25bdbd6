"""The sandbox address plan and index/CIDR allocation (distinct sandboxes, clear clash errors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from propolis.cni.plugin import host_ifname
from propolis.errors import ValidationError
from propolis_sandbox import config
from propolis_sandbox.config import SandboxConfig, SandboxState, allocate


@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(config, "RUN_ROOT", tmp_path)
    return tmp_path


def record(cfg: SandboxConfig) -> None:
    SandboxState(config={"name": cfg.name, "nodes": cfg.nodes, "index": cfg.index,
                         "cluster_cidr": cfg.cluster_cidr, "service_cidr": cfg.service_cidr}).save(cfg.state_path)


def test_names_follow_conventions() -> None:
    cfg = SandboxConfig(name="s", nodes=3, index=4)
    assert cfg.node_names() == ["s-worker", "s-worker2", "s-worker3"]
    assert cfg.node_netns(2) == "pp-s-2" and cfg.underlay_netns == "pp-s-underlay"
    assert cfg.node_ip(2) == "172.30.4.2" and cfg.pod_cidr(2) == "10.244.2.0/24"
    assert cfg.pod_netns("default", "web") == "pp-s-default-web"
    assert len(cfg.pod_netns("a" * 63, "b" * 63)) < 70
    assert re.fullmatch(r"lxc[0-9a-f]{11}", host_ifname("abc"))  # the CNI plugin's name, IFNAMSIZ-safe
    assert host_ifname("abc") != host_ifname("abd")
    assert cfg.owns_pin_dir("s-worker2") and not cfg.owns_pin_dir("s-worker-x")


def test_allocation_gives_distinct_index_and_cidr(run_root: Path) -> None:
    first = allocate("one", 2, None, None)
    record(first)
    second = allocate("two", 2, None, None)
    assert (first.index, first.cluster_cidr) == (1, "10.244.0.0/16")
    assert second.index == 2 and second.cluster_cidr == "10.245.0.0/16"
    assert first.underlay_network != second.underlay_network


def test_explicit_cidr_clash_is_refused(run_root: Path) -> None:
    record(allocate("one", 2, "10.50.0.0/16", None))
    with pytest.raises(ValidationError) as info:
        allocate("two", 2, "10.50.128.0/17", None)
    assert info.value.field == "cluster_cidr" and "'one'" in info.value.reason


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        SandboxConfig(name="Bad_Name")
    with pytest.raises(ValidationError):
        SandboxConfig(name="s", nodes=0)
    with pytest.raises(ValidationError):
        SandboxConfig(name="s", cluster_cidr="10.96.0.0/12")  # overlaps the service CIDR
