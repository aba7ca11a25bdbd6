import argparse
from dataclasses import dataclass

import pytest

from propolis.errors import ValidationError
from propolis.runtime import settings
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Demo(CommonSettings):
    policy_enforcement: str = setting("default", "mode", choices=("default", "always", "never"))
    ring_size: int = setting(4095, "flows kept", unit="flows")
    enable_thing: bool = setting(False, "a switch")


def _parse(argv):
    p = argparse.ArgumentParser()
    settings.add_arguments(p, Demo)
    return p.parse_args(argv)


def test_flag_beats_env_beats_default():
    env = {"PROPOLIS_RING_SIZE": "100", "PROPOLIS_NODE_NAME": "env-node"}
    cfg = settings.load(Demo, _parse(["--ring-size", "7"]), env)
    assert cfg.ring_size == 7 and cfg.node_name == "env-node" and cfg.policy_enforcement == "default"


def test_types_are_converted():
    cfg = settings.load(Demo, _parse(["--enable-thing", "true", "--heartbeat-interval", "0.5"]), {})
    assert cfg.enable_thing is True and cfg.heartbeat_interval == 0.5


@pytest.mark.parametrize("argv, field", [
    (["--ring-size", "many"], "ring_size"),
    (["--policy-enforcement", "sometimes"], "policy_enforcement"),
    (["--nats-url", "http://x"], "nats_url"),
    (["--cluster-id", "300"], "cluster_id"),
    (["--enable-thing", "maybe"], "enable_thing"),
])
def test_invalid_values_name_the_field(argv, field):
    with pytest.raises(ValidationError) as err:
        settings.load(Demo, _parse(argv), {})
    assert err.value.field == field


def test_describe_hides_passwords():
    rows = dict((f, v) for f, v, _ in settings.describe(Demo(nats_password="secret")))
    assert rows["--nats-password"] == "***"
