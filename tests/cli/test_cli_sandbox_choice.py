"""Which sandbox a bus-reading verb talks to: `--name` (or $PROPOLIS_SANDBOX_NAME) like the sandbox verbs,
else the default sandbox `propolis`, else `propolis dev up`; never silently another sandbox. The admin
credentials come from the root-only file the state names."""

from __future__ import annotations

import argparse
import json

import pytest

from propolis.bus import permissions
from propolis.cli import common
from propolis.cli.main import build_parser
from propolis.errors import CliError


def fake_sandbox(root, name: str, port: int) -> permissions.Credentials:
    admin, users = permissions.generate_credentials(["hubble"], nodes={"hubble": [f"{name}-worker"]})
    creds = root / name / "nats" / "credentials.json"
    permissions.save_credentials(creds, admin, users)
    (root / name / "state.json").write_text(json.dumps({"nats_url": f"nats://127.0.0.1:{port}",
                                                        "nats_credentials": str(creds)}))
    return admin


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUN_ROOT", tmp_path)
    monkeypatch.delenv("PROPOLIS_NATS_URL", raising=False)
    monkeypatch.delenv("PROPOLIS_SANDBOX_NAME", raising=False)
    return tmp_path


def args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"nats_url": None, "sandbox": None, **kw})


def test_without_a_name_another_sandbox_is_refused_not_read(run_root):
    fake_sandbox(run_root, "blue", 4001)
    fake_sandbox(run_root, "green", 4002)
    with pytest.raises(CliError, match=r"no sandbox 'propolis' is running; running: blue, green: .*--name"):
        common.resolve_nats(args())


def test_a_named_sandbox_is_read_as_its_admin(run_root):
    fake_sandbox(run_root, "blue", 4001)
    admin = fake_sandbox(run_root, "green", 4002)
    assert common.resolve_nats(args(sandbox="green")) == ("nats://127.0.0.1:4002", "admin", admin.password)
    assert (run_root / "green" / "nats" / "credentials.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CliError, match="no sandbox 'red'"):
        common.resolve_nats(args(sandbox="red"))


def test_the_default_sandbox_is_propolis(run_root):
    fake_sandbox(run_root, "blue", 4001)
    admin = fake_sandbox(run_root, "propolis", 4003)
    assert common.resolve_nats(args()) == ("nats://127.0.0.1:4003", "admin", admin.password)


@pytest.mark.parametrize("verb", [["observe"], ["status"], ["hubble", "status"], ["hubble", "nodes"],
                                  ["policy", "get"], ["policy", "selectors"], ["identity", "list"],
                                  ["endpoint", "list"], ["bus", "kv", "B"], ["bus", "tail", "x.>"]])
def test_every_bus_reading_verb_takes_name(verb, monkeypatch):
    monkeypatch.delenv("PROPOLIS_SANDBOX_NAME", raising=False)
    parsed = build_parser().parse_args([*verb, "--name", "blue"])
    assert parsed.sandbox == "blue"
    monkeypatch.setenv("PROPOLIS_SANDBOX_NAME", "green")  # as the sandbox verbs: the environment's default
    assert build_parser().parse_args(verb).sandbox == "green"
