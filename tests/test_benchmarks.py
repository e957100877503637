"""The 7B GPU benchmark's script at its scaled-down CPU shape: it runs the real callbacks and reports every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_llama7b_gpu_benchmark_runs_at_the_cpu_shape(tmp_path):
    out = tmp_path / "llama7b_gpu_cpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llama7b_gpu.py"), "--profile", "cpu", "--threads", "1", "--layers", "2",
         "--calibration-prompts", "32", "--warmup", "1", "--steps", "2", "--memory-steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # The set-up ran both callbacks through a real Trainer: each took time, and projectors came out of it.
    setup = result["setup"]
    assert setup["subspace_init_seconds"] > 0 and setup["null_space_seconds"] > 0 and setup["calibration_tokens"] == 32 * 32
    assert 0.0 <= setup["null_fraction_range"][0] <= setup["null_fraction_range"][1] <= 1.0
    designs = {row["design"]: row for row in result["designs"]}
    assert list(designs) == ["lora", "guardspace", "guardspace_half_null", "official_dense_P"]
    assert designs["lora"]["time_ratio_vs_lora"] == 1.0 and designs["lora"]["projector_bytes"] == 0
    # Stored bases at d = n/2 hold n^2/2 floats per distinct input; the official design n^2 per module.
    assert 0 < designs["guardspace_half_null"]["projector_bytes"] < designs["official_dense_P"]["projector_bytes"]
    assert all(row["tokens_per_s"] > 0 and len(row["step_seconds"]) == 2 for row in designs.values())
    assert set(result["goals"]) == {"setup_seconds", "guardspace_step_ratio", "guardspace_half_null_step_ratio", "projector_percent_of_weights"}
    assert "| official_dense_P |" in proc.stdout
