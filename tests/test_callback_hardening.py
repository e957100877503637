"""The holes a new user falls into with the GuardSpace callbacks: reuse, unsupported LoRA variants, resume, caches,
long prompts and bad settings. Each test failed before its fix."""

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from peft import LoraConfig, get_peft_model
from test_null_space_projection import EXACT, NULL_PROMPTS, calibration_ids, guardspace, train

from conftest import CALIBRATION_PROMPTS, logits, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.prompts import encode_prompts
from guardspace_pl.testing import relative_error, tiny_llama


class PeftModule(BoringModel):
    """A user's LightningModule around any LoraConfig."""

    def __init__(self, config: LoraConfig, seed: int = 0):
        super().__init__()
        self.lm = get_peft_model(tiny_llama(seed=seed), config)

    def training_step(self, batch, batch_idx):
        return self.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.lm.parameters() if p.requires_grad], lr=1e-2)


def fit(module, tokenizer, tmp_path, callbacks, steps=10, **kwargs):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4))
    return trainer


def calibration_drift(model, reference, tokenizer) -> float:
    return max(relative_error(logits(model, ids), logits(reference, ids)) for ids in calibration_ids(tokenizer))


# ------------------------------------------------------------------ item 2: one instance, two fits, two models
def test_reused_callbacks_rebuild_for_a_second_model(tokenizer, tmp_path):
    callbacks = guardspace(tokenizer)
    first, _ = train(tokenizer, tmp_path / "a", callbacks, steps=10)
    assert calibration_drift(first.model, tiny_llama(), tokenizer) < 1e-3
    # Same callback objects, another model (other weights): its own decomposition and projectors, not the first's.
    pl.seed_everything(0)
    second = GuardSpaceLM.from_pretrained_model(
        tiny_llama(seed=7), tokenizer, lora_rank=4, lora_alpha=4, learning_rate=1e-2, warmup_ratio=0.0
    )
    pl.Trainer(max_steps=10, callbacks=callbacks, **trainer_kwargs(tmp_path / "b")).fit(
        second, task_loader(tokenizer, count=16, batch_size=4)
    )
    assert calibration_drift(second.model, tiny_llama(seed=7), tokenizer) < 1e-3


# ------------------------------------------------------------------ item 3: LoRA variants
@pytest.mark.parametrize(
    "config, match",
    [
        (LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True), "DoRA"),
        (
            LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
            "modules_to_save",
        ),
        (LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True), "lora_bias"),
    ],
    ids=["dora", "modules_to_save", "lora_bias"],
)
# PEFT warns that lora_bias on bias-free layers cannot merge; the callback must reject the variant either way.
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_lora_variants_that_break_the_protection_are_rejected(tokenizer, tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        fit(
            PeftModule(config),
            tokenizer,
            tmp_path,
            [NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, **EXACT)],
            steps=1,
        )


def test_rslora_scaling_keeps_the_invariant(tokenizer, tmp_path):
    module = PeftModule(
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"], use_rslora=True)
    )
    callbacks = [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, **EXACT),
    ]
    fit(module, tokenizer, tmp_path, callbacks, steps=20)
    assert calibration_drift(module.lm, tiny_llama(), tokenizer) < 1e-3


def test_subspace_init_keeps_the_function_of_a_nonzero_adapter(tokenizer, tmp_path):
    """PiSSA (like a loaded adapter) starts with B != 0: the init must decompose W + s B A, not drop B A."""
    module = PeftModule(
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa")
    )
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = logits(module.lm, ids)
    module.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in module.lm.parameters() if p.requires_grad], lr=0.0
    )
    fit(module, tokenizer, tmp_path, [SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False)], steps=1)
    assert relative_error(logits(module.lm, ids), before) < 1e-4


# ------------------------------------------------------------------ item 4: resume
def _checkpoint(tokenizer, tmp_path, callbacks) -> str:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    train(tokenizer, tmp_path / "run", callbacks + [checkpoint], steps=4, enable_checkpointing=True)
    return str(next((tmp_path / "ckpt").glob("*.ckpt")))


def _resume(tokenizer, tmp_path, callbacks, ckpt_path):
    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=4, lora_alpha=4, learning_rate=1e-2, warmup_ratio=0.0
    )
    trainer = pl.Trainer(max_steps=8, callbacks=callbacks, **trainer_kwargs(tmp_path / "resume"))
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4), ckpt_path=ckpt_path)


def test_resuming_a_checkpoint_without_the_callback_is_an_error(tokenizer, tmp_path):
    plain = _checkpoint(tokenizer, tmp_path, [])
    with pytest.raises(ValueError, match="holds no SafetySubspaceInit state"):
        _resume(tokenizer, tmp_path, [SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False)], plain)


def test_resuming_with_another_threshold_names_the_setting(tokenizer, tmp_path):
    ckpt = _checkpoint(tokenizer, tmp_path, guardspace(tokenizer))
    changed = [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, threshold=1e-3, min_eigenvalue=1e-12),
    ]
    with pytest.raises(ValueError, match=r"threshold=1e-10 in the checkpoint but 0.001 now"):
        _resume(tokenizer, tmp_path, changed, ckpt)


# ------------------------------------------------------------------ item 5: caches
def test_corrupt_cache_file_is_recomputed_with_a_warning(tokenizer, tmp_path):
    cache = tmp_path / "cache"
    first = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4, learning_rate=0.0)
    fit(
        first,
        tokenizer,
        tmp_path / "a",
        [SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, cache_dir=str(cache), progress_bar=False)],
        steps=1,
    )
    (cache_file,) = cache.glob("subspace_*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated by a killed job
    second = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4, learning_rate=0.0)
    callback = SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, cache_dir=str(cache), progress_bar=False)
    with pytest.warns(UserWarning, match="cannot be read"):
        fit(second, tokenizer, tmp_path / "b", [callback], steps=1)
    assert not callback.loaded_from_cache
    for (n, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    torch.load(cache_file, weights_only=True)  # rewritten whole


def test_unwritable_cache_dir_fails_before_computing(tokenizer, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    calls = []
    monkeypatch.setattr(SafetySubspaceInit, "_compute", lambda *a, **k: calls.append(1))
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    with pytest.raises(PermissionError, match="not writable"):
        fit(
            module,
            tokenizer,
            tmp_path,
            [SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, cache_dir=str(blocker / "cache"), progress_bar=False)],
            steps=1,
        )
    assert calls == []


# ------------------------------------------------------------------ item 7: long prompts
def test_long_calibration_prompts_keep_their_end_and_are_counted(tokenizer):
    long_prompt = "Explain in detail " + "and in more detail " * 40 + "how to build a bomb"
    with pytest.warns(UserWarning, match="1 of 2 calibration prompts are longer than max_length=64"):
        ids = encode_prompts(tokenizer, [long_prompt, "short one"], "chat_template", max_length=64)
    full = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": long_prompt}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert len(ids[0]) == 64
    assert ids[0][-20:] == full[-20:]  # the instruction's end and the assistant header survive
    assert ids[0][:8] == full[:8]  # and so does the user header
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tokenizer, ["short one"], "chat_template", max_length=64)


# ------------------------------------------------------------------ errors that should be clear and early
def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match=r"fraction .* in \[0, 1\)"):
        NullSpaceProjection(threshold=2.0, threshold_mode="energy")
    for cls in (SafetySubspaceInit, NullSpaceProjection):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            cls(batch_size=0)
        with pytest.raises(ValueError, match="sample_normalization"):
            cls(sample_normalization="l2")
        with pytest.raises(TypeError, match="not one string"):
            cls(calibration_prompts="how to build a bomb")


def test_nan_weight_names_the_layer(tokenizer, tmp_path):
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    with torch.no_grad():
        module.model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj"):
        fit(
            module,
            tokenizer,
            tmp_path,
            [SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False)],
            steps=1,
        )


def test_reports_are_written_as_json(tokenizer, tmp_path):
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    report = tmp_path / "null.json"
    fit(
        module,
        tokenizer,
        tmp_path,
        [NullSpaceProjection(NULL_PROMPTS, tokenizer, report_path=str(report), progress_bar=False, **EXACT)],
        steps=1,
    )
    rows = json.loads(report.read_text())
    assert len(rows) == 14 and all(0 < row["null_dim"] <= row["in_features"] for row in rows)
