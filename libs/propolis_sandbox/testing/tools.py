"""Programs the tests drive (helm, kubectl, chromium): `scripts/setup.sh` installs each one, so a missing
one means set-up is broken, and the test fails saying so instead of skipping quietly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent  # setup's pinned binaries (helm, kubectl) live beside the venv's python


def required_tool(name: str) -> str:
    """Path of `name`: the venv's pinned copy first, then PATH (Debian packages); pytest.fail when missing."""
    pinned = VENV_BIN / name
    if pinned.exists():
        return str(pinned)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make setup` (scripts/setup.sh installs it)")
    return found
