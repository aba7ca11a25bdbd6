"""The demo's policy manifests are the Cilium deep dive's examples, verbatim (when the seed text is at hand)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from propolis_sandbox import demo

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "cilium-deep-dive.txt"


def seed_manifest(name: str) -> dict:
    """The YAML document named `name` in the seed text (it ends where the prose starts again)."""
    lines = SEED.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == f"name: {name}")
    start = max(i for i in range(at) if lines[i].startswith("apiVersion:"))
    end = start + 1
    while end < len(lines) and not (lines[end] and not lines[end][0].isspace() and lines[end][0] != "-"
                                    and not re.match(r"^[A-Za-z][\w-]*:(\s|$)", lines[end])):
        end += 1
    return yaml.safe_load("\n".join(lines[start:end]))


def test_demo_policies_parse_and_name_their_kinds():
    docs = [yaml.safe_load(p.read_text()) for p in demo.POLICIES]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("NetworkPolicy", "allow-frontend"), ("CiliumNetworkPolicy", "api-l7-policy"),
        ("CiliumNetworkPolicy", "allow-aws-egress")]


@pytest.mark.skipif(not SEED.exists(), reason=f"{SEED} not there (the workplace's shared seed text)")
def test_demo_policies_are_the_seed_examples_verbatim():
    assert demo.POLICIES
    for path in demo.POLICIES:
        mine = yaml.safe_load(path.read_text())
        assert mine == seed_manifest(mine["metadata"]["name"]), path.name
