"""Every service's wiring builds without starting anything (hive's cells_test idea).

`build(settings)` only constructs components: no socket, no file, no BPF syscall, no thread. Each
component names what it requires, and `check_wiring` refuses a dependency that is missing or starts
later, naming the component. Run with the default settings of each service, like `--describe`.
"""

from __future__ import annotations

import importlib
import socket
import threading
from pathlib import Path

import pytest

from propolis.errors import ValidationError
from propolis.runtime.component import Component, check_wiring
from propolis.runtime.health import State

SERVICES = sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "services").glob("*/main.py"))
#: imported before any test patches I/O away (importing may load libraries; building may not do I/O)
MODULES = {name: importlib.import_module(f"services.{name}.main") for name in SERVICES}


@pytest.fixture
def no_io(monkeypatch, tmp_path):
    """Fail the test on any socket, file open for writing or new thread a constructor would start."""
    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a constructor did I/O: {what}{args[:2]}")
        return fail

    monkeypatch.setattr(socket, "socket", refuse("socket"))
    monkeypatch.setattr(threading.Thread, "start", refuse("thread start"))
    import builtins
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"a constructor opened {file!r} for writing")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    import os
    monkeypatch.setattr(os, "mkdir", refuse("mkdir"))
    monkeypatch.setattr(os, "makedirs", refuse("makedirs"))


def test_every_service_is_found():
    assert {"datapath_writer", "k8s_watcher", "identity_allocator", "hubble", "hubble_relay"} <= set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_wiring_builds_without_io_and_dependencies_come_first(service, no_io):
    module = MODULES[service]
    settings = module.Settings(node_name="wiring-test-worker")
    components = module.build(settings)
    assert components and all(isinstance(c, Component) for c in components)
    check_wiring(components)
    for c in components:
        assert c.title, f"{service}: component {c.name} has no title"
        assert c.health.state is State.STOPPED, f"{service}: {c.name} is not idle after construction"


def test_datapath_writer_declares_its_components():
    module = importlib.import_module("propolis_services.datapath_writer.main")
    components = {c.name: c for c in module.build(module.Settings(node_name="n"))}
    assert list(components) == ["datapath", "inputs", "lb", "ipcache-publisher", "bandwidth", "socket-lb", "enforcer",
                                "endpoints", "ct-gc"]
    requires = {name: {d.name for d in c.requires} for name, c in components.items()}
    assert requires["enforcer"] == {"datapath", "inputs", "lb", "ipcache-publisher", "bandwidth"}
    assert requires["endpoints"] == {"datapath", "inputs", "enforcer"}
    assert requires["ct-gc"] == {"datapath"}
    assert requires["socket-lb"] == {"datapath"}


def test_identity_allocator_declares_its_components():
    module = importlib.import_module("propolis_services.identity_allocator.main")
    components = {c.name: c for c in module.build(module.Settings(node_name="n"))}
    assert list(components) == ["gc-lease", "endpoint-records", "identity-gc"]
    requires = {name: {d.name for d in c.requires} for name, c in components.items()}
    assert requires == {"gc-lease": set(), "endpoint-records": {"gc-lease"}, "identity-gc": {"endpoint-records"}}


def test_k8s_watcher_declares_its_components():
    module = importlib.import_module("propolis_services.k8s_watcher.main")
    components = module.build(module.Settings(node_name="n"))
    assert [c.name for c in components] == ["kube-client", "mirror"]
    assert [d.name for d in components[1].requires] == ["kube-client"]


def test_no_service_main_runs_a_sync_loop_of_its_own():
    """Desired -> actual loops live in the library on the reconciler (reconcile.py); main.py wires them."""
    assert SERVICES
    for name in SERVICES:
        source = Path(MODULES[name].__file__).read_text()
        assert "while True" not in source and "asyncio.sleep" not in source, f"services/{name}/main.py loops"


def test_check_wiring_names_a_dependency_that_starts_later():
    class A(Component):
        name, title = "a", "first"

    class B(Component):
        name, title = "b", "needs a"

    a = A()
    b = B(a)
    check_wiring([a, b])
    with pytest.raises(ValidationError) as err:
        check_wiring([b, a])
    assert err.value.field == "components.b" and "'a', which is after it" in str(err.value)
    with pytest.raises(ValidationError, match="not in the service"):
        check_wiring([b])
