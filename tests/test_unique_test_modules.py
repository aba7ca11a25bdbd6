"""pytest imports test modules by basename (rootdir mode): two files with one name break collection."""

from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_test_module_basenames_are_unique():
    names = Counter(p.name for d in ("tests", "integration", "services") for p in (ROOT / d).rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], [n for n, c in names.items() if c > 1]
