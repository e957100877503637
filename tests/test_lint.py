"""The linter (ruff, configured in pyproject.toml: line length 120, pyflakes, pycodestyle errors, import order) finds
nothing in the package folders, the benchmarks, the scripts and the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["guardspace_pl", "callbacks", "datamodules", "benchmarks", "scripts", "tests"]


def ruff_command() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.importorskip("ruff", reason="ruff is in the dev extra: pip install -e '.[dev]'")
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing_in_the_package_folders():
    proc = subprocess.run([*ruff_command(), "check", *FOLDERS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_is_configured_with_line_length_120():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["ruff"]["line-length"] == 120
    assert any(dep.startswith("ruff") for dep in config["project"]["optional-dependencies"]["dev"])
