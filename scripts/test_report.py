#!/usr/bin/env python3
"""The end of a CI run: every skipped test by name and reason, then one closing line with the totals.

Why: `.ci/run` runs pytest more than once, so pytest's own `-rs` summary of an early run scrolls away
above the later ones; a skipped test must be seen where the run ends. Reads the JUnit XML files
pytest wrote (`--junitxml`); standard library only, so it runs before or without the venv.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Totals:
    passed: int = 0
    failed: int = 0
    skipped: list[str] = field(default_factory=list)  # "path::test: reason"


def node_id(case: ET.Element) -> str:
    """pytest's node id back from JUnit's classname (dotted module path, then any class) and name."""
    parts = case.get("classname", "").split(".")
    module = next((i for i in range(len(parts), 0, -1) if parts[i - 1].startswith("test_")), len(parts))
    path = "/".join(parts[:module]) + ".py"
    return "::".join([path, *parts[module:], case.get("name", "")])


def read(report: Path, totals: Totals) -> None:
    for case in ET.parse(report).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            totals.skipped.append(f"{node_id(case)}: {skipped.get('message', '').strip()}")
        elif case.find("failure") is not None or case.find("error") is not None:
            totals.failed += 1
        else:
            totals.passed += 1


def main(paths: list[str]) -> int:
    totals = Totals()
    missing = [p for p in paths if not Path(p).is_file()]
    for path in paths:
        if path not in missing:
            read(Path(path), totals)
    print(f"\n=== skipped tests: {len(totals.skipped)} ===")
    for line in totals.skipped:
        print(f"SKIPPED {line}")
    for path in missing:
        print(f"NOT RUN {path} (that pytest run did not finish)")
    print(f"total: {totals.passed} passed, {totals.failed} failed, {len(totals.skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
