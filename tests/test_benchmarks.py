"""The 7B GPU benchmark's script at its scaled-down CPU shape: it runs the real callbacks and reports every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guardspace_pl.testing import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_llama7b_gpu_benchmark_runs_at_the_cpu_shape(tmp_path):
    out = tmp_path / "llama7b_gpu_cpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.llama7b_gpu", "--profile", "cpu", "--threads", "1", "--layers", "2",
         "--calibration-prompts", "32", "--warmup", "1", "--steps", "2", "--memory-steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # The set-up ran both callbacks through a real Trainer: each took time, and projectors came out of it.
    setup = result["setup"]
    assert setup["subspace_init_seconds"] > 0 and setup["null_space_seconds"] > 0
    assert setup["calibration_tokens"] == 32 * 32
    assert 0.0 <= setup["null_fraction_range"][0] <= setup["null_fraction_range"][1] <= 1.0
    designs = {row["design"]: row for row in result["designs"]}
    assert list(designs) == ["lora", "guardspace", "guardspace_half_null", "official_dense_P", "spf", "asft"]
    assert designs["lora"]["time_ratio_vs_lora"] == 1.0 and designs["lora"]["projector_bytes"] == 0
    # Stored bases at d = n/2 hold n^2/2 floats per distinct input; the official design n^2 per module.
    assert 0 < designs["guardspace_half_null"]["projector_bytes"] < designs["official_dense_P"]["projector_bytes"]
    assert all(row["tokens_per_s"] > 0 and len(row["step_seconds"]) == 2 for row in designs.values())
    assert set(result["goals"]) == {
        "setup_seconds", "guardspace_step_ratio", "guardspace_half_null_step_ratio", "projector_percent_of_weights"
    }
    assert "| official_dense_P |" in proc.stdout


def test_step_overhead_benchmark_times_the_training_time_designs(tmp_path):
    out = tmp_path / "step_overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_overhead", "--profile", "cpu", "--threads", "1", "--layers", "1",
         "--hidden", "64", "--mlp", "128", "--heads", "2", "--batch", "1", "--seq", "16", "--rank", "4",
         "--designs", "lora", "spf", "spf_refresh10", "asft", "--warmup", "1", "--steps", "3",
         "--memory-steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    designs = {row["design"]: row for row in json.loads(out.read_text())["designs"]}
    assert list(designs) == ["lora", "spf", "spf_refresh10", "asft"]
    for row in designs.values():
        assert len(row["step_seconds"]) == 3
        # The mean counts SPF's refresh steps, which the median leaves out when refresh_every > 1.
        mean = sum(row["step_seconds"]) / 3
        assert row["mean_step_s"] == pytest.approx(mean)
        assert row["mean_time_ratio_vs_lora"] == pytest.approx(mean / designs["lora"]["mean_step_s"])
    assert "| spf_refresh10 |" in proc.stdout and "step ms (mean)" in proc.stdout
    # SPF's own work, timed by part: the refresh (safety pass + decomposition) every 1 or 10 steps, the gate every step.
    spf, slow = designs["spf"]["part_seconds"], designs["spf_refresh10"]["part_seconds"]
    assert [len(spf[p]) for p in ("safety_pass", "decomposition", "gate")] == [3, 3, 3]
    assert len(slow["gate"]) == 3 and len(slow.get("safety_pass", [])) <= 1
    assert designs["lora"]["part_seconds"] == {} and "Where the added time goes" in proc.stdout


def test_safety_loss_benchmark_times_both_losses(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path / "model"))
    out = tmp_path / "safety_loss.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.safety_loss", "--model", model_dir, "--tokens", "12", "--labelled", "4",
         "--rank", "2", "--repeats", "2", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [len(t) for t in result["seconds"].values()] == [2, 2] and result["vocabulary"] == 259
    assert set(result["peak_bytes_added"]) == set(result["seconds"])
    assert "response_loss" in proc.stdout and "vs labels= loss" in proc.stdout


BENCHMARK_FILES = sorted((ROOT / "benchmarks").rglob("*.py"))


def test_benchmarks_are_a_package_run_with_python_m():
    """`python -m benchmarks.<name>` needs packages; sys.path hacks and a module named like a PyPI package break it."""
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    assert (ROOT / "benchmarks" / "safety" / "__init__.py").is_file()
    # `evaluate` is the Hugging Face package lm-eval installs: a sibling evaluate.py shadows it.
    assert not (ROOT / "benchmarks" / "safety" / "evaluate.py").exists()
    offenders = [str(f.relative_to(ROOT)) for f in BENCHMARK_FILES if "sys.path" in f.read_text()]
    assert offenders == [], f"sys.path edits in {offenders}"


def test_benchmarks_share_one_write_json_and_one_environment_helper():
    defs = {name: [str(f.relative_to(ROOT)) for f in BENCHMARK_FILES if f"def {name}(" in f.read_text()]
            for name in ("write_json", "environment", "cpu_model", "cpu_model_name")}
    assert defs["write_json"] == [], "use guardspace_pl.io.write_json"
    assert defs["environment"] == ["benchmarks/_common.py"] and defs["cpu_model"] == []


@pytest.mark.parametrize("module", ["benchmarks.safety_loss",
                                    "benchmarks.safety.run", "benchmarks.safety.attack", "benchmarks.safety.align",
                                    "benchmarks.safety.evaluation", "benchmarks.safety.report", "benchmarks.posthoc",
                                    "benchmarks.separability", "benchmarks.probe_gate"])
def test_benchmark_module_help_runs_with_python_m(module):
    command = [sys.executable, "-m", module, "--help"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if module.split(".")[-1] in {"attack", "align", "evaluation", "report"}:
        assert proc.returncode == 0, proc.stderr[-2000:]  # a library module of the benchmark: importing it suffices
    else:
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("folder", ["safety_cpu", "safety_methods_cpu"])
def test_committed_safety_results_record_repo_relative_paths(folder):
    results = json.loads((ROOT / "benchmarks" / "results" / folder / "results.json").read_text())
    assert results["plots"] and all(not Path(p).is_absolute() for p in results["plots"]), results["plots"]
    assert all((ROOT / p).is_file() for p in results["plots"])
    assert str(ROOT) not in json.dumps(results)


def test_repo_relative_path_helper(tmp_path):
    from benchmarks._common import repo_relative

    assert repo_relative(ROOT / "benchmarks" / "results" / "x.json") == "benchmarks/results/x.json"
    assert repo_relative(tmp_path / "x.json") == str(tmp_path / "x.json")  # outside the repo: kept as is


def test_probe_gate_counts_what_the_gated_model_does_and_chooses_on_the_sets_given():
    import torch

    from benchmarks.probe_gate import choose, gated_flags, measure

    fired = torch.tensor([True, False, False, True])
    # A harmful prompt counts as complied with only if the gate let it through AND the original model complied.
    assert gated_flags("harmful", fired, [True, True, False, False]) == [False, True, False, False]
    # A safe prompt counts as refused if the gate fired OR the original model refused it.
    assert gated_flags("safe", fired, [False, False, True, False]) == [True, False, True, True]
    # Fronting a patch, a fired prompt counts what the patched model did with it (here: complied, then refused).
    assert gated_flags("harmful", fired, [True, True, False, False], [True, False, False, False]) == [
        True, True, False, False]
    assert gated_flags("safe", fired, [False, False, True, False], [False, True, True, True]) == [
        False, False, True, True]

    kinds = {"advbench": "harmful", "xstest": "safe", "harmless": "safe"}
    original = {"advbench": [True] * 4, "xstest": [False] * 4, "harmless": [False] * 4}
    # Layer 1's logits separate the sets (harmful high, safe low); layer 0's do not.
    separating = {"advbench": torch.tensor([2.0, 3.0, 2.5, 1.5]), "xstest": torch.tensor([-1.0, -2.0, 0.5, -1.5]),
                  "harmless": torch.tensor([-3.0, -2.5, -2.0, -3.5])}
    flat = {name: torch.zeros(4) for name in kinds}
    layer, threshold, worst = choose([flat, separating], kinds, original, thresholds=(-1.0, 0.0, 1.0))
    assert (layer, threshold, worst) == (1, 1.0, 0.0)  # 1.0 lets no harmful prompt through and refuses no safe one
    rates, ratio = measure(separating, kinds, original, 0.0)
    assert rates["xstest"]["count"] == 1 and ratio == (25.0 / 15.0)  # one of four XSTest prompts refused at 0
    assert rates["advbench"]["percent"] == 0.0 and rates["harmless"]["ci95"][0] == 0.0
    # Behind a patch that refuses every harmful prompt and answers every safe one, firing at 0 costs nothing more:
    # at 0 the separating layer now meets every goal too, and ties go to the threshold nearest 0.
    patch = {"advbench": [False] * 4, "xstest": [False] * 4, "harmless": [False] * 4}
    assert measure(separating, kinds, original, 0.0, patch)[1] == 0.0
    assert choose([flat, separating], kinds, original, (-1.0, 0.0, 1.0), patch) == (1, 0.0, 0.0)
