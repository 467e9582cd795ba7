"""The code style checks run with the tests, so the README's test command covers them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is not installed in this environment: pip install -e '.[test]'")
    done = subprocess.run([str(ruff), "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_nothing_in_src():
    """The type checker's settings are pyproject.toml's [tool.mypy]."""
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.fail("mypy is not installed in this environment: pip install -e '.[test]'")
    done = subprocess.run([str(mypy)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr
