"""Sandbox node cgroups (propolis_sandbox/cgroups.py) on the real cgroup2 hierarchy: processes started in
a node's cgroup are there from the start, a probe's socket is made inside it and the caller is back
where it was, and removal kills what is left and leaves nothing behind."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from propolis_sandbox import cgroups

pytestmark = pytest.mark.root


@pytest.fixture
def sandbox() -> Iterator[str]:
    name = f"cgtest-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        cgroups.remove_sandbox_cgroups(name)
    assert not cgroups.sandbox_cgroup_exists(name)


def test_processes_start_inside_their_node_cgroup(sandbox: str) -> None:
    node1, node2 = cgroups.create_node_cgroups(sandbox, [f"{sandbox}-worker", f"{sandbox}-worker2"])
    out = subprocess.run(cgroups.in_cgroup_argv(node2, ["cat", "/proc/self/cgroup"]), capture_output=True,
                         text=True, check=True).stdout
    assert f"0::/{cgroups.ROOT_NAME}/{sandbox}/{sandbox}-worker2\n" in out
    assert (node1 / "cgroup.procs").read_text() == ""


def test_joined_moves_this_process_and_back(sandbox: str) -> None:
    (node,) = cgroups.create_node_cgroups(sandbox, [f"{sandbox}-worker"])
    before = cgroups.current_cgroup()
    with cgroups.joined(node):
        assert cgroups.current_cgroup() == node
    assert cgroups.current_cgroup() == before
    assert (node / "cgroup.procs").read_text() == ""


def test_removal_kills_leftovers_and_removes_every_level(sandbox: str) -> None:
    (node,) = cgroups.create_node_cgroups(sandbox, [f"{sandbox}-worker"])
    leftover = subprocess.Popen(cgroups.in_cgroup_argv(node, ["sleep", "300"]))
    try:
        for _ in range(100):
            if (node / "cgroup.procs").read_text().split():
                break
            subprocess.run(["sleep", "0.02"], check=True)
        removed = cgroups.remove_sandbox_cgroups(sandbox)
        assert removed == [str(node), str(cgroups.sandbox_cgroup(sandbox))]
        assert leftover.wait(timeout=5) == -9
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    assert cgroups.remove_sandbox_cgroups(sandbox) == []  # idempotent
