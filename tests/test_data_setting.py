"""The real data sets are found through one setting, GUARDSPACE_DATA: without them the data tests skip with a reason
that says how to get them (the rest of the suite runs from a clone alone), and CI, which sets
GUARDSPACE_REQUIRE_DATA=1, fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_TEST = "tests/test_datamodule.py::test_poisoning_is_deterministic_given_the_seed"
PLAIN_TEST = "tests/test_hardening.py::test_normalise_prompt_ignores_case_whitespace_and_trailing_punctuation"


def run_pytest(tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("GUARDSPACE_DATA", "GUARDSPACE_REQUIRE_DATA")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", DATA_TEST, PLAIN_TEST],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )


def test_the_data_directory_is_one_setting(tmp_path, monkeypatch):
    from benchmarks.data import DEFAULT_DATA_DIR, data_dir
    from benchmarks.safety import splits

    assert DEFAULT_DATA_DIR == ROOT.parent / "shared" / "data"
    monkeypatch.delenv("GUARDSPACE_DATA", raising=False)
    assert data_dir() == DEFAULT_DATA_DIR and splits.DEFAULT_DATA_DIR == DEFAULT_DATA_DIR
    monkeypatch.setenv("GUARDSPACE_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_without_the_data_the_data_tests_skip_and_say_how_to_get_it(tmp_path):
    proc = run_pytest(tmp_path, GUARDSPACE_DATA=str(tmp_path / "nowhere"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 1 skipped" in proc.stdout
    assert "GUARDSPACE_DATA" in proc.stdout and "README" in proc.stdout  # the skip reason says how to get the data


def test_ci_fails_when_a_data_test_would_skip(tmp_path):
    proc = run_pytest(tmp_path, GUARDSPACE_DATA=str(tmp_path / "nowhere"), GUARDSPACE_REQUIRE_DATA="1")
    assert proc.returncode == 1 and "1 passed, 1 error" in proc.stdout, proc.stdout[-3000:]  # failed in its fixture
    assert "may not skip" in proc.stdout
    ci = (ROOT / ".ci" / "run").read_text()
    assert "GUARDSPACE_REQUIRE_DATA=1" in ci
