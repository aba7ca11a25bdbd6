"""Fixture: two node namespaces with pods and the LB datapath, built once per module and
torn down even when tests fail (lb_topology.teardown)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from lb_topology import Cluster, build, teardown


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    c = build()
    try:
        yield c
    finally:
        teardown(c)
