"""`propolis demo` end to end on its own sandbox: exit 0 means every demo connection behaved as the
policies say, before and after they were applied; a re-run starts again from "no policy"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from propolis_sandbox import cluster
from propolis_sandbox.fixture import leftovers, unique_name

pytestmark = pytest.mark.root


def test_demo_runs_twice_and_leaves_nothing_after_down():
    name = unique_name("demo")
    try:
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "demo", "--name", name,
                                   "--skip-connectivity"], capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
            assert "(!)" not in proc.stdout
            assert "default/outsider      production/api              8080  dropped   dropped" in proc.stdout
            assert f"propolis sandbox down --name {name}" in proc.stdout
    finally:
        cluster.down(name)
    assert not any(leftovers(name).values())
