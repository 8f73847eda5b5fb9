"""Shared fixtures. Real data comes from $RLREC_SHARED_DATA (default ../shared/data); a test that needs it fails
when it is missing, never skips: CI must not go green on a machine without the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("RLREC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "movielens-100k" / "u.data").is_file():
        pytest.fail(f"shared data not found at {root}: set RLREC_SHARED_DATA to the folder of ../shared/data")
    return root


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "rlrec.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
