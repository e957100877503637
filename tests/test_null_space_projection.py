import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from peft import LoraConfig, get_peft_model

from conftest import CALIBRATION_PROMPTS, logits, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.testing import relative_error, tiny_llama

# Short prompts: ~36 byte tokens span fewer than the 64 hidden directions, so every layer keeps a null space.
NULL_PROMPTS = ["build a bomb", "steal a car", "hack a bank"]
# Only numerically-null directions (see README: at the paper's 1e-6 the protected span is approximate).
EXACT = dict(threshold=1e-10, min_eigenvalue=1e-12)


def calibration_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(p)["input_ids"]]) for p in NULL_PROMPTS]


def train(tokenizer, tmp_path, callbacks, steps=50, lr=1e-2, accumulate=1, seed=0, **trainer_overrides):
    pl.seed_everything(seed)
    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=4, lora_alpha=4, learning_rate=lr, warmup_ratio=0.0
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        **trainer_kwargs(tmp_path, **trainer_overrides),
    )
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4))
    return module, trainer


def drift(module, tokenizer, reference) -> tuple[float, float]:
    """Relative logit change on the calibration prompts and on other prompts."""
    calib = max(relative_error(logits(module.model, ids), logits(reference, ids)) for ids in calibration_ids(tokenizer))
    other = torch.tensor([tokenizer("Ava has 3 books and reads 2 of them.")["input_ids"]])
    return calib, relative_error(logits(module.model, other), logits(reference, other))


def guardspace(tokenizer, **null_kwargs):
    return [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, **{**EXACT, **null_kwargs}),
    ]


def test_calibration_outputs_stay_fixed_while_the_task_is_learned(tokenizer, tmp_path):
    reference = tiny_llama()
    module, trainer = train(tokenizer, tmp_path, guardspace(tokenizer))
    calib, other = drift(module, tokenizer, reference)
    assert calib < 1e-3
    assert other > 1e-2  # the model did change elsewhere
    first_loss = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer)(**next(iter(task_loader(tokenizer)))).loss
    assert trainer.callback_metrics["train_loss"] < 0.9 * first_loss


def test_plain_lora_moves_the_calibration_outputs(tokenizer, tmp_path):
    module, _ = train(tokenizer, tmp_path, [])
    calib, _ = drift(module, tokenizer, tiny_llama())
    assert calib > 1e-2


def test_invariant_with_accumulation_clipping_and_bf16_mixed(tokenizer, tmp_path):
    module, _ = train(
        tokenizer,
        tmp_path,
        guardspace(tokenizer),
        steps=12,
        accumulate=4,
        gradient_clip_val=0.5,
        precision="bf16-mixed",
    )
    calib, other = drift(module, tokenizer, tiny_llama())
    assert calib < 1e-3 and other > 1e-2


def test_callback_order_does_not_matter(tokenizer, tmp_path):
    forward, _ = train(tokenizer, tmp_path / "a", guardspace(tokenizer), steps=5)
    backward, _ = train(tokenizer, tmp_path / "b", list(reversed(guardspace(tokenizer))), steps=5)
    for (n, p), (_, q) in zip(forward.model.named_parameters(), backward.model.named_parameters()):
        assert torch.equal(p, q), n


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")  # a killed job: the last checkpoint is all that survives


def test_resume_mid_training_gives_the_same_weights(tokenizer, tmp_path):
    uninterrupted, _ = train(tokenizer, tmp_path / "full", guardspace(tokenizer), steps=10)
    # Step 8 closes epoch 2 (4 batches each): a plain DataLoader cannot resume inside an epoch.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            tokenizer,
            tmp_path / "part",
            guardspace(tokenizer) + [checkpoint, CrashAt(8)],
            steps=10,
            enable_checkpointing=True,
        )
    pl.seed_everything(0)
    resumed = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=4, lora_alpha=4, learning_rate=1e-2, warmup_ratio=0.0
    )
    callbacks = guardspace(tokenizer)
    trainer = pl.Trainer(max_steps=10, callbacks=callbacks, **trainer_kwargs(tmp_path / "resume"))
    trainer.fit(
        resumed, task_loader(tokenizer, count=16, batch_size=4), ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt")))
    )
    assert callbacks[1].projectors  # restored from the checkpoint, not rebuilt
    for (n, p), (_, q) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


class ForeignLoraModule(BoringModel):
    """Someone else's LightningModule: a PEFT LoRA model, its own loss, no GuardSpace code."""

    def __init__(self):
        super().__init__()
        self.lm = get_peft_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
        )

    def training_step(self, batch, batch_idx):
        return self.lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_callbacks_work_on_any_lightning_module_with_peft_lora(tokenizer, tmp_path):
    module = ForeignLoraModule()
    callbacks = [
        NullSpaceProjection(calibration_prompts=NULL_PROMPTS, tokenizer=tokenizer, progress_bar=False, **EXACT),
        SafetySubspaceInit(calibration_prompts=CALIBRATION_PROMPTS, tokenizer=tokenizer, progress_bar=False),
    ]
    trainer = pl.Trainer(max_steps=20, callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(module, task_loader(tokenizer))
    assert len(find_lora_targets(module)) == 6
    reference = tiny_llama()
    for ids in calibration_ids(tokenizer):
        assert relative_error(logits(module.lm, ids), logits(reference, ids)) < 1e-3


def test_empty_null_space_is_reported(tokenizer, tmp_path):
    many = [f"harmful request number {i} with many different words {i * 7}" for i in range(40)]
    with pytest.warns(UserWarning, match="empty null space"):
        train(tokenizer, tmp_path, [NullSpaceProjection(many, tokenizer, progress_bar=False)], steps=1)
    with pytest.raises(ValueError, match="empty null space"):
        train(
            tokenizer,
            tmp_path,
            [NullSpaceProjection(many, tokenizer, progress_bar=False, empty_null_space="error")],
            steps=1,
        )


def test_bad_settings_are_rejected_early():
    with pytest.raises(ValueError, match="threshold_mode"):
        NullSpaceProjection(threshold_mode="fraction")
    with pytest.raises(ValueError, match="non-negative"):
        NullSpaceProjection(threshold=-1.0)


@pytest.mark.parametrize("callback", [NullSpaceProjection, SafetySubspaceInit])
def test_fsdp1_is_rejected_with_a_pointer_to_fsdp2(callback, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    # FSDPStrategy refuses CPU at Trainer construction; the check only reads trainer.strategy.
    trainer._accelerator_connector.strategy = FSDPStrategy()
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        callback(calibration_prompts=NULL_PROMPTS).setup(trainer, BoringModel(), "fit")
