"""Endpoint options (`propolis endpoint config`): Cilium's spellings, errors naming the option, the host
endpoint's options kept across a restart, and the CLI's endpoint forms."""

from __future__ import annotations

import pytest

from propolis.cli.identity_cmd import parse_endpoint_options
from propolis.errors import CliError, ValidationError
from propolis.writer import endpoint_config
from propolis.writer.endpoints import LocalEndpoint


def endpoint() -> LocalEndpoint:
    return LocalEndpoint(1, "c1", "ns", "pod", "10.244.1.2", 5, "lxc1", "pp-ns-pod")


@pytest.mark.parametrize("value,expected", [("Enabled", True), ("true", True), ("ON", True),
                                            ("Disabled", False), ("false", False), ("off", False)])
def test_switch_spellings(value: str, expected: bool) -> None:
    ep = endpoint()
    ep.policy_audit_mode = not expected
    assert endpoint_config.apply_options(ep, {"PolicyAuditMode": value})
    assert ep.policy_audit_mode is expected
    assert not endpoint_config.apply_options(ep, {"PolicyAuditMode": value})  # no change the second time


def test_bad_options_name_the_option_and_change_nothing() -> None:
    ep = endpoint()
    with pytest.raises(ValidationError) as bad_value:
        endpoint_config.apply_options(ep, {"PolicyAuditMode": "maybe"})
    assert bad_value.value.field == "PolicyAuditMode"
    with pytest.raises(ValidationError) as unknown:
        endpoint_config.apply_options(ep, {"PolicyAuditMode": "Enabled", "Debug": "true"})
    assert unknown.value.field == "Debug" and not ep.policy_audit_mode
    assert endpoint_config.options_of(ep) == {"PolicyAuditMode": "Disabled"}


def test_host_endpoint_options_survive_a_restart(tmp_path) -> None:
    path = tmp_path / "host-endpoint-n1.json"
    first = endpoint_config.HostEndpointOptions(path)
    first.load()  # no file yet: defaults
    assert endpoint_config.apply_options(first, {"PolicyAuditMode": "Enabled"})
    first.save()
    again = endpoint_config.HostEndpointOptions(path)
    again.load()
    assert again.policy_audit_mode and endpoint_config.options_of(again) == {"PolicyAuditMode": "Enabled"}


def test_cli_endpoint_forms() -> None:
    assert parse_endpoint_options("ns/pod", ["PolicyAuditMode=Enabled"]) == ("ns", "pod", {"PolicyAuditMode": "Enabled"})
    assert parse_endpoint_options("node:n1", []) == ("", "", {})
    for bad, options in (("pod", []), ("/pod", []), ("ns/pod", ["PolicyAuditMode"])):
        with pytest.raises(CliError):
            parse_endpoint_options(bad, options)
