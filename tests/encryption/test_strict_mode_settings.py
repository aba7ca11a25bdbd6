"""encryption.strictMode settings: from the sandbox option and the writer's flags into cilium_runtime_config."""

from __future__ import annotations

import importlib

import pytest

from propolis.errors import ValidationError
from propolis.maps import config
from propolis.suite import service_env
from propolis_sandbox.config import SandboxConfig

WRITER = importlib.import_module("propolis_services.datapath_writer.main")


def test_runtime_config_carries_the_strict_cidr_and_reads_back():
    value = config.make_value(strict_mode_cidr="10.244.0.0/16", strict_allow_remote_node_identities=True)
    assert bytes(value)[16:20] == bytes([10, 244, 0, 0])  # network byte order, as the program compares
    assert bytes(value)[20:24] == bytes([255, 255, 0, 0])
    decoded = config.decode(value)
    assert decoded["strict_mode_cidr"] == "10.244.0.0/16" and decoded["strict_allow_remote_node_identities"]
    off = config.decode(config.make_value())
    assert off["strict_mode_cidr"] == "" and not off["strict_allow_remote_node_identities"]


@pytest.mark.parametrize("cidr", ["10.244.0.0/33", "pods", "0.0.0.0/0", "10.244.0.1/16"])
def test_bad_strict_cidr_is_refused_naming_the_field(cidr):
    with pytest.raises(ValidationError, match="encryption_strict_mode_cidr"):
        config.make_value(strict_mode_cidr=cidr)


def test_writer_refuses_strict_mode_without_cidr_or_device():
    with pytest.raises(ValidationError, match="encryption_strict_mode_cidr"):
        WRITER.Settings(node_name="n", devices="eth0", encryption_strict_mode_enabled=True)
    with pytest.raises(ValidationError, match="devices"):
        WRITER.Settings(node_name="n", encryption_strict_mode_enabled=True, encryption_strict_mode_cidr="10.0.0.0/8")
    WRITER.Settings(node_name="n", devices="eth0", encryption_strict_mode_enabled=True,
                    encryption_strict_mode_cidr="10.0.0.0/8")


def test_sandbox_strict_mode_needs_encryption_and_reaches_the_writer_as_the_cluster_cidr():
    with pytest.raises(ValidationError, match="encryption_strict_mode"):
        SandboxConfig(name="s", encryption_strict_mode=True)
    cfg = SandboxConfig(name="s", encryption="wireguard", encryption_strict_mode=True)
    env = service_env({"nats_url": "nats://x", "sandbox": "s", "kubeconfig": "k", "run_dir": "r",
                       "cluster_cidr": cfg.cluster_cidr, "encryption_strict_mode": cfg.encryption_strict_mode})
    assert env["PROPOLIS_ENCRYPTION_STRICT_MODE_ENABLED"] == "true"
    assert env["PROPOLIS_ENCRYPTION_STRICT_MODE_CIDR"] == "10.244.0.0/16"
