"""``python -m guardspace_pl repair``: SafeLoRA on an already fine-tuned adapter or GuardSpaceLM checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from guardspace_pl import GuardSpaceLM
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.repair import METHODS, build_parser, main
from guardspace_pl.safelora import safelora_factors
from guardspace_pl.safety_reference import SafetyReference
from guardspace_pl.testing import byte_tokenizer, relative_error, save_tiny_llama, tiny_llama
from tests.conftest import (
    CALIBRATION_PROMPTS,
    LLAMA_PROJECTIONS,
    logits,
    random_adapter,
    task_loader,
    train_chat_lora,
    trainer_kwargs,
)

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def setup(tmp_path):
    base = save_tiny_llama(str(tmp_path / "tiny"))
    adapter = random_adapter(base, tmp_path / "finetuned", ["q_proj", "v_proj", "up_proj"], seed=1)
    patch = random_adapter(base, tmp_path / "patch", ["q_proj", "v_proj", "up_proj", "down_proj"], seed=2, r=2)
    return tmp_path, base, adapter, patch


def expected_B(adapter_dir, patch_dir, **settings):
    """The pure function on the adapter's own tensors: what repair must write."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(Path(adapter_dir).parent / "tiny"), str(adapter_dir)
    )
    reference = SafetyReference.from_patch_adapter(patch_dir)
    factors = {t.hf_name: (t.lora_A.detach(), t.lora_B.detach()) for t in find_lora_targets(model)}
    return safelora_factors(factors, {n: reference.vector(n) for n in factors}, **settings)


def test_repair_an_adapter_writes_the_projected_adapter_and_a_report(setup):
    tmp_path, base, adapter, patch = setup
    out = tmp_path / "repaired"
    main(["--method", "safelora", "--adapter", str(adapter), "--base", base, "--reference-adapter", str(patch),
          "--out", str(out), "--kind", "adapter", "--k", "2"])
    new_B, expected = expected_B(adapter, patch, num_projected_modules=2)
    report = json.loads((out / "repair_report.json").read_text())
    assert report["report"]["num_projected"] == 2
    assert {m["name"] for m in report["report"]["modules"] if m["projected"]} == expected.projected_names
    repaired = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    for t in find_lora_targets(repaired):
        torch.testing.assert_close(t.lora_B.detach(), new_B[t.hf_name])
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    assert relative_error(logits(repaired, IDS), logits(original, IDS)) > 1e-4  # the repair changed the model

    merged_dir = tmp_path / "merged"
    main([
        "--method", "safelora", "--adapter", str(adapter), "--base", base, "--reference-adapter", str(patch),
        "--out", str(merged_dir), "--kind", "merged", "--mode", "threshold", "--threshold", "0.5",
        "--projector", "orthonormal",
    ])
    new_B, _ = expected_B(adapter, patch, mode="threshold", threshold=0.5, projector="orthonormal")
    with torch.no_grad():
        for t in find_lora_targets(original):
            t.lora_B.copy_(new_B[t.hf_name])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert relative_error(logits(merged, IDS), logits(original, IDS)) < 1e-5


def test_repair_with_a_base_aligned_checkpoint_pair(setup):
    tmp_path, base, adapter, _ = setup
    aligned = tiny_llama(seed=0)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            p.add_(0.01 * torch.randn_like(p)) if name.endswith("proj.weight") else None
    aligned.save_pretrained(tmp_path / "aligned")
    report = main([
        "--method", "safelora", "--adapter", str(adapter), "--base", base, "--reference-base", base,
        "--reference-aligned", str(tmp_path / "aligned"), "--out", str(tmp_path / "out"), "--kind", "adapter",
        "--k", "3",
    ])
    assert report["report"]["num_projected"] == 3 and report["reference"].startswith("checkpoints")


def test_repair_a_guardspace_checkpoint_exports_relative_to_the_original_base(tmp_path):
    from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit

    base = save_tiny_llama(str(tmp_path / "tiny"))
    patch = random_adapter(
        base, tmp_path / "patch", list(LLAMA_PROJECTIONS), seed=3
    )
    tokenizer = byte_tokenizer()
    module = GuardSpaceLM(
        base, lora_rank=4, lora_alpha=4, learning_rate=1e-2, warmup_ratio=0.0, adapter_dir=str(tmp_path / "adapter")
    )
    module._tokenizer = tokenizer
    callbacks = [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(
            CALIBRATION_PROMPTS, tokenizer, progress_bar=False, threshold=0.05, threshold_mode="energy"
        ),
    ]
    trainer = pl.Trainer(max_steps=3, callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(module, task_loader(tokenizer, count=12))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = tmp_path / "repaired"
    report = main([
        "--method", "safelora", "--checkpoint", str(tmp_path / "last.ckpt"), "--reference-adapter", str(patch),
        "--out", str(out), "--kind", "adapter", "--k", "4",
    ])
    assert report["report"]["num_projected"] == 4 and report["base"] == base
    # In memory: the same SafeLoRA on the trained module; the exported adapter must reproduce it on the ORIGINAL base.
    from guardspace_pl.safelora import apply_safelora

    apply_safelora(find_lora_targets(module), SafetyReference.from_patch_adapter(patch), num_projected_modules=4)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    assert relative_error(logits(served, IDS), logits(module.model, IDS)) < 1e-4


def run_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_early_error(setup, capsys):
    tmp_path, base, adapter, patch = setup
    common = ["--method", "safelora", "--out", str(tmp_path / "o"), "--kind", "adapter"]
    source = ["--adapter", str(adapter), "--base", base]
    ref = ["--reference-adapter", str(patch)]
    assert "needs --base" in run_error(capsys, *common, "--adapter", str(adapter), *ref)
    assert "exactly one fine-tuned model" in run_error(capsys, *common, *source, "--checkpoint", "x.ckpt", *ref)
    assert "needs one safety reference" in run_error(capsys, *common, *source)
    assert "go together" in run_error(capsys, *common, *source, "--reference-base", base)
    assert "must lie in [-1, 1]" in run_error(
        capsys, *common, *source, *ref, "--mode", "threshold", "--threshold", "1.5"
    )
    assert "positive integer" in run_error(capsys, *common, *source, *ref, "--k", "0")
    assert "Checkpoint missing.ckpt does not exist" in run_error(capsys, *common, "--checkpoint", "missing.ckpt", *ref)
    # K larger than the number of LoRA layers the reference covers (6 here).
    assert "(K) = 7 but the safety reference covers only 6" in run_error(capsys, *common, *source, *ref, "--k", "7")
    # A reference for another model.
    small = save_tiny_llama(str(tmp_path / "small"), hidden_size=32, intermediate_size=64)
    other = random_adapter(small, tmp_path / "other_patch", ["q_proj"], seed=4)
    assert "is (32, 32) in the reference but (64, 64) in the model" in run_error(
        capsys, *common, *source, "--reference-adapter", str(other), "--k", "1"
    )
    # An adapter without LoRA layers, rejected before the base is loaded.
    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    assert "IA3 adapter, not LoRA" in run_error(
        capsys, *common, "--adapter", str(tmp_path / "ia3"), "--base", base, *ref
    )
    assert not (tmp_path / "o").exists()  # nothing was written by any failed run


def test_help_documents_every_flag(capsys):
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    documented = {f for a in flags for f in a.option_strings}
    assert {
        "--method", "--checkpoint", "--adapter", "--base", "--reference-adapter", "--reference-base",
        "--reference-aligned", "--out", "--kind", "--mode", "--k", "--threshold", "--projector",
    } <= documented
    assert all(a.help and len(a.help) > 20 for a in flags), [a.option_strings for a in flags if not a.help]
    assert set(METHODS) >= {"safelora"}
    from guardspace_pl.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:  # routed by `python -m guardspace_pl repair`
        cli_main(["repair", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--reference-aligned" in out and "safelora options" in out


# --------------------------------------------------------------------------------------------- FSDP2
def fsdp2_config(tmp_path: Path, patch: Path, base: str) -> Path:
    import yaml

    config = {
        "seed_everything": 0,
        "model": {
            "model_name_or_path": base,
            "lora_rank": 4,
            "lora_alpha": 4,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "adapter_dir": str(tmp_path / "fsdp_adapter"),
        },
        "data": {
            "task": "builtin:arithmetic",
            "num_task_samples": 16,
            "batch_size": 4,
            "max_length": 128,
            "training_format": "alpaca",
            "calibration_source": str(tmp_path / "calibration.txt"),
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1},
                },
                {
                    "class_path": "guardspace_pl.callbacks.SafeLoRA",
                    "init_args": {
                        "reference": str(patch),
                        "num_projected_modules": 5,
                        "report_path": str(tmp_path / "fsdp_safelora.json"),
                    },
                },
            ],
        },
    }
    (tmp_path / "calibration.txt").write_text("build a bomb\nsteal a car\n")
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_repair_of_an_fsdp2_checkpoint_equals_the_callback_under_fsdp2(tmp_path):
    base = save_tiny_llama(str(tmp_path / "tiny"))
    patch = random_adapter(
        base, tmp_path / "patch", list(LLAMA_PROJECTIONS), seed=5
    )
    config = fsdp2_config(tmp_path, patch, base)
    result = subprocess.run(
        [sys.executable, "-m", "guardspace_pl", "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir()  # sharded (DCP), written before on_fit_end: the weights SafeLoRA starts from
    out = tmp_path / "repaired"
    report = main(["--method", "safelora", "--checkpoint", str(checkpoint), "--reference-adapter", str(patch),
                   "--out", str(out), "--kind", "adapter", "--k", "5"])
    in_fit = json.loads((tmp_path / "fsdp_safelora.json").read_text())
    projected = lambda r: {m["name"] for m in r["modules"] if m["projected"]}  # noqa: E731
    assert projected(report["report"]) == projected(in_fit) and len(projected(in_fit)) == 5
    for ours, theirs in zip(report["report"]["modules"], in_fit["modules"]):
        assert ours["name"] == theirs["name"] and ours["cosine"] == pytest.approx(theirs["cosine"], abs=1e-5)
    # The callback's result under FSDP2 (saved by GuardSpaceLM after it) and the single-process repair of the
    # checkpoint compute the same model.
    fsdp = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "fsdp_adapter"))
    repaired = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    assert relative_error(logits(repaired, IDS), logits(fsdp, IDS)) < 1e-5
    from guardspace_pl.export import load_checkpoint_module

    trained = load_checkpoint_module(checkpoint).model  # before SafeLoRA: the callback and the repair did change it
    assert relative_error(logits(trained, IDS), logits(fsdp, IDS)) > 1e-3
    assert max(t.lora_B.abs().max().item() for t in find_lora_targets(trained)) > 1e-3


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_repair_on_smollm2_with_a_patch_made_in_the_test(tmp_path):
    from guardspace_pl.loading import load_causal_lm, load_tokenizer

    name = "builtin:smollm2-135m-instruct"
    tokenizer = load_tokenizer(name)
    torch.manual_seed(0)
    refusals = [(p, "I can't help with that. It could cause harm.") for p in CALIBRATION_PROMPTS]
    patch = train_chat_lora(name, tokenizer, refusals, ["q_proj", "v_proj", "o_proj"], 3, tmp_path / "patch")
    tasks = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in [(2, 3), (10, 7), (21, 4), (8, 8)]]
    adapter = train_chat_lora(name, tokenizer, tasks, ["q_proj", "v_proj"], 3, tmp_path / "finetuned")
    out = tmp_path / "repaired"
    report = main(["--method", "safelora", "--adapter", str(adapter), "--base", name, "--reference-adapter", str(patch),
                   "--out", str(out), "--kind", "adapter", "--k", "10"])
    modules = report["report"]["modules"]
    assert len(modules) == 60  # 30 layers x (q, v), all covered by the patch
    assert report["report"]["num_projected"] == 10
    assert all(-1 <= m["cosine"] <= 1 for m in modules)
    repaired = PeftModel.from_pretrained(load_causal_lm(name), str(out))
    finetuned = PeftModel.from_pretrained(load_causal_lm(name), str(adapter))
    reference = SafetyReference.from_patch_adapter(patch)
    projected = {m["name"] for m in modules if m["projected"]}
    for new, old in zip(find_lora_targets(repaired), find_lora_targets(finetuned)):
        if new.hf_name in projected:
            expected = reference.vector(new.hf_name).apply_alignment_matrix(old.lora_B.detach())
            torch.testing.assert_close(new.lora_B.detach(), expected, rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(new.lora_B, old.lora_B)
