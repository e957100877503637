"""The shipped demo configs of the training-time methods run end to end through the real CLI on the real
SmolLM2-135M-Instruct (shortened to two optimizer steps, outputs redirected into the test's folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA_PROJECTIONS, random_adapter
from guardspace_pl.loading import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


def redirected_config(name: str, tmp_path: Path) -> Path:
    """The shipped config with every ``outputs/`` path moved under ``tmp_path``."""
    text = (ROOT / "configs" / name).read_text()
    assert "outputs/" in text
    path = tmp_path / name
    path.write_text(text.replace("outputs/", f"{tmp_path}/outputs/"))
    return path


def run_fit(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "guardspace_pl", "fit", "--config", str(config), "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2", "--trainer.logger", "CSVLogger",
               "--trainer.logger.save_dir", str(config.parent / "logs"), *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def logged_columns(tmp_path: Path) -> set[str]:
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    return set(metrics.read_text().splitlines()[0].split(","))


@pytest.mark.slow
def test_demo_asft_config_trains_against_a_safety_patch(tmp_path):
    # The config reads outputs/safety_patch/adapter (what `align --config configs/safety_patch_smollm2.yaml` writes);
    # a random patch on every projection stands in for it here.
    patch = tmp_path / "outputs" / "safety_patch" / "adapter"
    random_adapter(load_causal_lm("builtin:smollm2-135m-instruct"), str(patch), LLAMA_PROJECTIONS, seed=0, scale=0.01)
    proc = run_fit(redirected_config("demo_asft.yaml", tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "demo_asft" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "outputs" / "demo_asft" / "checkpoints" / "last.ckpt").exists()
    assert "asft/regularizer" in logged_columns(tmp_path)


@pytest.mark.slow
def test_demo_asft_config_without_its_patch_is_a_clear_error(tmp_path):
    proc = run_fit(redirected_config("demo_asft.yaml", tmp_path))
    assert proc.returncode != 0
    # Refused while the config is read, before any model loads; the message names the path and how to make a patch.
    assert "safety_patch/adapter is not a PEFT adapter directory" in proc.stderr
    assert "python -m guardspace_pl align --config configs/safety_patch_smollm2.yaml" in proc.stderr
    assert "Loading weights" not in proc.stderr


@pytest.mark.slow
def test_demo_spf_config_runs(tmp_path):
    proc = run_fit(redirected_config("demo_spf.yaml", tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "outputs" / "demo_spf" / "adapter" / "adapter_model.safetensors").exists()
    assert {"spf/conflicts", "spf/cosine_before", "spf/cosine_after"} <= logged_columns(tmp_path)
