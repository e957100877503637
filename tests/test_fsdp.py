"""FSDP2 (Lightning's ModelParallelStrategy) with 2 CPU processes over gloo, against one process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_worker(
    tmp_path: Path, processes: int, guardspace: bool, model_dir: str | None = None, asft_patch: str | None = None,
    spf: bool = False,
) -> list[dict]:
    tags = f"{'-gs' if guardspace else ''}{'-dir' if model_dir else ''}{'-asft' if asft_patch else ''}{'-spf' if spf else ''}"
    out = tmp_path / f"p{processes}{tags}"
    command = [sys.executable, str(WORKER), "--processes", str(processes), "--out", str(out)]
    if guardspace:
        command.append("--guardspace")
    if model_dir:
        command += ["--model-dir", model_dir]
    if asft_patch:
        command += ["--asft-patch", asft_patch]
    if spf:
        command.append("--spf")
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


@pytest.mark.slow
def test_asft_under_two_process_fsdp2_matches_one_process(tmp_path):
    """AsFT adds its analytic gradient to each rank's shard of lora_A/lora_B: the result equals one process."""
    from peft import LoraConfig, get_peft_model

    from guardspace_pl.testing import tiny_llama

    torch.manual_seed(1)
    patch = get_peft_model(tiny_llama(), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ))
    with torch.no_grad():
        for name, param in patch.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    patch.save_pretrained(str(tmp_path / "patch"))
    (single,) = run_worker(tmp_path, 1, False, asft_patch=str(tmp_path / "patch"))
    rank0, rank1 = run_worker(tmp_path, 2, False, asft_patch=str(tmp_path / "patch"))
    (plain,) = run_worker(tmp_path, 1, False)
    assert bool(rank0["__sharded__"])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    assert_same_weights(single, rank0, rtol=1e-4)
    # The regulariser did act: AsFT's adapters differ from plain LoRA's.
    assert any(not torch.allclose(single[n], plain[n], atol=1e-6) for n in single if "lora_B" in n)


@pytest.mark.slow
def test_spf_under_two_process_fsdp2_matches_one_process(tmp_path):
    """SPF's safety gradient of sharded parameters (a backward into .grad, gathered) and its edit of each rank's
    shard give the weights of one process."""
    (single,) = run_worker(tmp_path, 1, False, spf=True)
    rank0, rank1 = run_worker(tmp_path, 2, False, spf=True)
    assert bool(rank0["__sharded__"])
    assert int(single["__spf_passes__"]) == int(rank0["__spf_passes__"]) == 4  # one safety gradient per step
    assert int(rank0["__spf_conflicts__"]) > 0  # the edit itself ran on the shards
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    assert_same_weights(single, rank0, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_reads_the_checkpoint_on_rank_zero_only_and_matches_one_process(tmp_path):
    from guardspace_pl.testing import save_tiny_llama

    model_dir = save_tiny_llama(str(tmp_path / "tiny"))
    (single,) = run_worker(tmp_path, 1, False, model_dir)
    rank0, rank1 = run_worker(tmp_path, 2, False, model_dir)
    assert single["__checkpoint_reads__"] == 1
    # Rank 1 built the model on the meta device and received its shards from rank 0.
    assert rank0["__checkpoint_reads__"] == 1 and rank1["__checkpoint_reads__"] == 0
    assert bool(rank0["__sharded__"])
    for name in (n for n in single if not n.startswith("__")):
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    # Same base weights, rotary buffers and random LoRA init as one process, hence the same training.
    assert any("rotary_emb.inv_freq" in name for name in single)
    assert_same_weights(single, rank0, rtol=1e-4)
    assert max(single[n].abs().max() for n in single if "lora_B" in n) > 1e-3


def fsdp2_config(tmp_path: Path) -> Path:
    import yaml

    from guardspace_pl.testing import save_tiny_llama

    (tmp_path / "calibration.txt").write_text("build a bomb\nsteal a car\nhack a bank\n")
    exact = {"progress_bar": False, "covariance_dtype": "float64"}
    config = {
        "seed_everything": 0,
        "model": {"model_name_or_path": save_tiny_llama(str(tmp_path / "tiny")), "lora_rank": 4, "lora_alpha": 4,
                  "learning_rate": 1e-2, "warmup_ratio": 0.0, "adapter_dir": str(tmp_path / "adapter")},
        "data": {"task": "builtin:arithmetic", "num_task_samples": 32, "batch_size": 4, "max_length": 192,
                 "calibration_source": str(tmp_path / "calibration.txt"), "training_format": "alpaca"},
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_steps": 6, "logger": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}},
            "callbacks": [
                {"class_path": "guardspace_pl.callbacks.SafetySubspaceInit", "init_args": exact},
                {"class_path": "guardspace_pl.callbacks.NullSpaceProjection",
                 "init_args": {**exact, "threshold": 1e-10, "min_eigenvalue": 1e-12}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 3, "save_top_k": -1}},
            ],
        },
    }
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "guardspace_pl", "fit", *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_cli_fit_under_fsdp2_resumes_mid_epoch_from_a_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file

    config = fsdp2_config(tmp_path)
    first = cli("--config", str(config), cwd=tmp_path)
    # Each callback says where its result came from; "from calibration" means computed in this run.
    assert "initialised from calibration" in first and "(from calibration)" in first
    step3 = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert step3.is_dir()  # a distributed (DCP) checkpoint: every rank wrote its shards
    resumed = cli("--config", str(config), "--ckpt_path", str(step3), "--model.adapter_dir", str(tmp_path / "resumed"), cwd=tmp_path)
    # Sharded strategies restore after on_fit_start: nothing may be recomputed before the restore overwrites it.
    assert "from calibration" not in resumed and "resuming" in resumed
    full = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert max(full[k].abs().max() for k in full if "lora_B" in k) > 1e-3

    # Export straight from the sharded checkpoint: a standard PEFT adapter on the ORIGINAL base gives the trained model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from guardspace_pl.export import load_checkpoint_module, main as export_main

    step6 = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    export_main(["--checkpoint", str(step6), "--out", str(tmp_path / "exported"), "--kind", "adapter"])
    trained = load_checkpoint_module(step6).model
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    served = PeftModel.from_pretrained(base, str(tmp_path / "exported"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, served(input_ids=ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
