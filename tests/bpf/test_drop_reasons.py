"""bpf/lib/drop.h and propolis.maps.drop say the same (codes, Cilium texts, Hubble names)."""

from __future__ import annotations

import re

from propolis.datapath.loader import bpf_source_dir
from propolis.maps.drop import DROP_REASONS, reason_name, reason_text

LINE = re.compile(r'#define\s+(DROP_\w+)\s+(\d+)\s+/\*\s+"([^"]+)"\s+(\w+)\s+\*/')


def test_header_and_python_agree():
    header = (bpf_source_dir() / "lib" / "drop.h").read_text()
    parsed = {int(code): (name, text, hubble) for name, code, text, hubble in LINE.findall(header)}
    assert len(parsed) == len(re.findall(r"^#define DROP_", header, re.M))
    python = {r.code: (r.c_name, r.text, r.hubble_name) for r in DROP_REASONS.values()}
    assert parsed == python


def test_names_of_well_known_reasons():
    assert reason_text(133) == "Policy denied" and reason_name(133) == "POLICY_DENIED"
    assert reason_text(181) == "Policy denied by denylist" and reason_name(181) == "POLICY_DENY"
    assert reason_text(0) == "Forwarded"
    assert reason_name(250) == "DROP_REASON_UNKNOWN"
