"""Export: a standard PEFT adapter on the ORIGINAL base, a merged model, and the CLI from a real checkpoint."""

import json
import runpy
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CALIBRATION_PROMPTS, LLAMA_PROJECTIONS, logits, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.export import export_merged_model, export_peft_adapter, lora_delta_factors, main
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.testing import byte_tokenizer, relative_error, save_tiny_llama, tiny_llama

NULL_PROMPTS = ["build a bomb", "steal a car", "hack a bank"]
LORA = dict(lora_rank=4, lora_alpha=8, learning_rate=1e-2, warmup_ratio=0.0)




def guardspace(tokenizer) -> list[pl.Callback]:
    return [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, threshold=1e-10, min_eigenvalue=1e-12),
    ]


def probe(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Ava has 3 books and reads 2 of them. <|assistant|>5")["input_ids"]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> GuardSpaceLM:
    """A tiny Llama after GuardSpace training: W' != W and A, B far from their initial values."""
    tokenizer = byte_tokenizer()
    pl.seed_everything(0)
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, **LORA)
    trainer = pl.Trainer(
        max_steps=8, callbacks=guardspace(tokenizer), **trainer_kwargs(tmp_path_factory.mktemp("train"))
    )
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4))
    module.eval()
    return module


def test_lora_delta_factors_are_exact_for_low_rank_matrices():
    torch.manual_seed(0)
    for m, n, k, randomized in [(48, 32, 6, False), (1300, 1100, 16, None)]:  # the second takes the randomized path
        delta = torch.randn(m, k, dtype=torch.float64) @ torch.randn(k, n, dtype=torch.float64)
        lora_A, lora_B = lora_delta_factors(delta, k, randomized=randomized)
        assert lora_A.shape == (k, n) and lora_B.shape == (m, k)
        assert relative_error(lora_B @ lora_A, delta) < 1e-10
        # Balanced split: both factors carry sqrt of the singular values.
        torch.testing.assert_close(lora_A.norm(dim=1), lora_B.norm(dim=0))
    with pytest.raises(ValueError, match="rank must be"):
        lora_delta_factors(torch.zeros(4, 3), 4)


def test_training_moved_the_frozen_residual(trained):
    original = dict(tiny_llama().named_modules())
    moved = [
        t.name
        for t in find_lora_targets(trained.model.get_base_model())
        if not torch.equal(t.base.weight, original[t.name].weight)
    ]
    assert len(moved) == 14  # every layer: W' = W - s B0 A0, so a plain adapter is relative to weights users lack


def test_exported_adapter_on_the_original_base_reproduces_the_trained_model(trained, tmp_path):
    ids = probe(byte_tokenizer())
    expected = logits(trained.model, ids)
    base = tiny_llama()
    result = export_peft_adapter(trained, base, tmp_path / "adapter")
    assert result.rank == 8 and result.max_residual < 1e-6
    assert not any("lora" in name for name, _ in base.named_modules())  # the caller's base is untouched

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 8, "LORA")
    projections = set(LLAMA_PROJECTIONS)
    assert set(config["target_modules"]) == projections

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert relative_error(logits(loaded, ids), expected) < 1e-4
    # The plain adapter (relative to W') applied to the original base is a different model.
    trained.model.save_pretrained(tmp_path / "plain")
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    assert relative_error(logits(plain, ids), expected) > 1e-2


def test_merged_model_reproduces_the_trained_model(trained, tmp_path):
    ids = probe(byte_tokenizer())
    export_merged_model(trained, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert relative_error(logits(merged, ids), logits(trained.model, ids)) < 1e-4
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tokenizer("abc")["input_ids"] == byte_tokenizer()("abc")["input_ids"]
    # The trained module still has its adapter.
    assert any("lora_" in name for name, _ in trained.model.named_parameters())


def test_export_of_a_plain_peft_model_on_some_layers_with_capped_ranks(tmp_path):
    """Any PeftModel; a subset of layers (full names in the config); 2r above min(m, n) (k_proj is 32 x 64)."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=20, lora_alpha=40, target_modules=["q_proj", "k_proj"], layers_to_transform=[1])
    )
    with torch.no_grad():  # a GuardSpace-like state: W' = W - s B0 A0, then trained A and B
        for target in find_lora_targets(model):
            b0, a0 = torch.randn_like(target.lora_B), torch.randn_like(target.lora_A)
            target.base.weight.sub_(target.scaling * 0.01 * b0 @ a0)
            target.lora_B.copy_(0.1 * torch.randn_like(target.lora_B))
    ids = probe(byte_tokenizer())
    result = export_peft_adapter(model, tiny_llama(), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert result.rank == 40 and set(config["target_modules"]) == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    }
    assert list(config["rank_pattern"].values()) == [32] and list(config["alpha_pattern"].values()) == [32]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert relative_error(logits(loaded, ids), logits(model, ids)) < 1e-4


def test_export_rejects_a_base_that_is_not_the_original(trained, tmp_path):
    with pytest.raises(ValueError, match="Non-LoRA tensors .* differ"):
        export_peft_adapter(trained, tiny_llama(seed=1), tmp_path / "a")
    with pytest.raises(ValueError, match="has shape"):
        export_peft_adapter(trained, tiny_llama(hidden_size=32, intermediate_size=64), tmp_path / "b")
    # Same everywhere but one adapted weight: the update is no longer of rank <= 2r.
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].mlp.up_proj.weight.add_(0.01 * torch.randn_like(base.model.layers[1].mlp.up_proj.weight))
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.*rank-8 update"):
        export_peft_adapter(trained, base, tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A real GuardSpaceLM run from a model directory, checkpointed by ModelCheckpoint."""
    root = tmp_path_factory.mktemp("cli")
    base_dir = save_tiny_llama(str(root / "base"))
    tokenizer = byte_tokenizer()
    pl.seed_everything(0)
    module = GuardSpaceLM(model_name_or_path=base_dir, adapter_dir=str(root / "plain_adapter"), **LORA)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_steps=4, callbacks=guardspace(tokenizer) + [checkpoint], **trainer_kwargs(root, enable_checkpointing=True)
    )
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4))
    module.eval()
    return root, base_dir, root / "ckpt" / "last.ckpt", module


def test_cli_exports_a_checkpoint_as_adapter_and_merged_model(checkpoint_run, capsys):
    root, base_dir, ckpt, module = checkpoint_run
    ids = probe(byte_tokenizer())
    expected = logits(module.model, ids)

    main(["--checkpoint", str(ckpt), "--out", str(root / "adapter"), "--kind", "adapter"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "adapter"
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir  # --base defaulted to the checkpoint's model_name_or_path
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), root / "adapter")
    assert relative_error(logits(loaded, ids), expected) < 1e-4

    main(["--checkpoint", str(ckpt), "--out", str(root / "merged"), "--kind", "merged", "--base", base_dir])
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert relative_error(logits(merged, ids), expected) < 1e-4
    assert (root / "merged" / "tokenizer.json").exists()


def test_cli_errors_are_clear(checkpoint_run, tmp_path, capsys):
    root, _, ckpt, _ = checkpoint_run
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--kind", "lora"])
    assert exit_info.value.code == 2 and "invalid choice: 'lora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path), "--kind", "merged"])
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    other = save_tiny_llama(str(tmp_path / "other"), hidden_size=32, intermediate_size=64)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--kind", "adapter", "--base", other])
    assert "does not match the trained one" in capsys.readouterr().err


def test_module_runs_as_a_script(monkeypatch, capsys):
    # `python -m guardspace_pl.export`, in process: a fresh interpreter spends its time importing Lightning.
    monkeypatch.setattr(sys, "argv", ["guardspace_pl.export", "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("guardspace_pl.export", run_name="__main__")
    assert exit_info.value.code == 0 and "--kind {adapter,merged}" in capsys.readouterr().out


class _Payload:
    """What a crafted checkpoint hides: unpickling it calls ``open(path, "w")``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_runs_no_code(checkpoint_run, tmp_path, capsys):
    _, _, ckpt, _ = checkpoint_run
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "pwned"
    state["hyper_parameters"]["model_name_or_path"] = _Payload(str(marker))
    crafted = tmp_path / "crafted.ckpt"
    torch.save(state, crafted)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(crafted), "--out", str(tmp_path / "out"), "--kind", "merged"])
    assert exit_info.value.code == 2 and "could run code when loaded" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
