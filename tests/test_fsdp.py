"""FSDP2 (Lightning's ModelParallelStrategy) with 2 CPU processes over gloo, against one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_worker(tmp_path: Path, processes: int, guardspace: bool) -> list[dict]:
    out = tmp_path / f"p{processes}{'-gs' if guardspace else ''}"
    command = [sys.executable, str(WORKER), "--processes", str(processes), "--out", str(out)]
    if guardspace:
        command.append("--guardspace")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=WORKER.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(processes)]


def assert_same_weights(single: dict, sharded: dict, rtol: float) -> None:
    for name, tensor in single.items():
        if name.startswith("__"):
            continue
        error = ((tensor - sharded[name]).norm() / tensor.norm().clamp_min(1e-12)).item()
        assert error < rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("guardspace", [False, True], ids=["lora", "guardspace"])
def test_two_process_fsdp2_matches_one_process(tmp_path, guardspace):
    (single,) = run_worker(tmp_path, 1, guardspace)
    rank0, rank1 = run_worker(tmp_path, 2, guardspace)
    assert bool(rank0["__sharded__"]) and not bool(single["__sharded__"])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    # GuardSpace: covariances are summed across ranks (3 prompts over 2 processes: unequal shares) and the SVDs
    # are split by layer; only float summation order differs from one process.
    assert_same_weights(single, rank0, rtol=1e-3 if guardspace else 1e-4)
    moved = [single[n] for n in single if "lora_B" in n]
    assert max(t.abs().max() for t in moved) > 1e-3  # training did happen
