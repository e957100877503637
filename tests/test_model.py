import lightning.pytorch as pl
import pytest
import torch

from conftest import LLAMA_PROJECTIONS, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.datamodules import Example, tokenize_example
from guardspace_pl.loading import load_causal_lm
from guardspace_pl.testing import save_tiny_llama, tiny_llama


def test_only_adapter_parameters_train_and_every_block_linear_is_adapted(tokenizer):
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, lora_rank=4)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(LLAMA_PROJECTIONS)
    assert not any("lm_head" in n or "embed" in n for n in trainable)


def test_loss_goes_down_on_a_repeated_batch(tokenizer, tmp_path):
    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=8, learning_rate=1e-2, warmup_ratio=0.0
    )
    batch = next(iter(task_loader(tokenizer, count=4, batch_size=4)))
    before = module(**batch).loss.item()
    trainer = pl.Trainer(max_steps=30, **trainer_kwargs(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 30, batch_size=None))
    assert module(**batch).loss.item() < before - 0.5  # deterministic: 5.61 -> 4.91 on this batch


def test_prompt_tokens_are_masked_exactly(tokenizer):
    example = Example("What is 2 + 3?", "2 + 3 = 5")
    for training_format in ("chat_template", "alpaca"):
        row = tokenize_example(tokenizer, example, training_format, max_length=512)
        prompt_len = len(row["input_ids"]) - len(tokenizer(example.response, add_special_tokens=False)["input_ids"]) - 1
        assert row["labels"][:prompt_len] == [-100] * prompt_len
        assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["input_ids"][prompt_len:-1]) == example.response


def test_unknown_target_module_names_the_real_ones(tokenizer):
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no module.*'q_proj'"):
        GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, target_modules=["qkv_proj"])


def test_loads_from_a_directory_and_rejects_a_non_model_path(tmp_path):
    directory = save_tiny_llama(str(tmp_path / "tiny"))
    module = GuardSpaceLM(model_name_or_path=directory, lora_rank=2)
    module.configure_model()
    assert module.tokenizer.pad_token is not None
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_saves_a_peft_adapter_at_fit_end(tokenizer, tmp_path):
    from peft import PeftModel

    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=4, adapter_dir=str(tmp_path / "adapter")
    )
    pl.Trainer(max_steps=2, **trainer_kwargs(tmp_path)).fit(module, task_loader(tokenizer, count=8))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            torch.testing.assert_close(dict(loaded.named_parameters())[name], p)


def test_a_long_prompt_never_masks_the_whole_row(tokenizer):
    example = Example("word " * 200, "The answer is 7.")
    row = tokenize_example(tokenizer, example, "chat_template", max_length=64)
    assert len(row["input_ids"]) == 64
    kept = [t for t in row["labels"] if t != -100]
    assert len(kept) >= 16  # a quarter of the row stays response: the loss is defined
    assert tokenizer.decode(row["input_ids"][-len(kept):]).startswith("The answer")
    assert "<|assistant|>" in tokenizer.decode(row["input_ids"][: 64 - len(kept)])  # the answer header survives


def test_activation_checkpointing_recomputes_blocks_in_backward_with_the_same_gradients(tokenizer):
    batch = next(iter(task_loader(tokenizer, count=2, batch_size=2)))
    grads, block_calls = [], []
    for checkpointing in (False, True):
        module = GuardSpaceLM.from_pretrained_model(
            tiny_llama(), tokenizer, lora_rank=4, activation_checkpointing=checkpointing
        )
        module.train()
        with torch.no_grad():  # non-zero B, so that lora_A gets a gradient too
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        calls = []
        module.model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
        module(**batch).loss.backward()
        block_calls.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    assert block_calls == [1, 2]  # the checkpointed block's layers run again in backward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
