"""ruff and mypy over the product code: no print() outside cli/, no blind except, no unused names
(ruff.toml); types check on the whole package (setup.cfg [mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "milter"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean():
    # The whole package, with the settings in setup.cfg ([mypy]): pymilter, berkeleydb and PyYAML ship no types.
    proc = subprocess.run([sys.executable, "-m", "mypy", "-p", "relaymilter"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
