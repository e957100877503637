"""``response_loss``: Hugging Face's ``labels=`` loss, from the first labelled position's logits only."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from guardspace_pl.losses import response_loss
from guardspace_pl.testing import tiny_llama


def batch(prompt_lengths: list[int], response_lengths: list[int], vocab: int = 250) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + response; labels on the response only."""
    width = max(p + r for p, r in zip(prompt_lengths, response_lengths))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (len(prompt_lengths), width), generator=generator)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        labels[i, p : p + r] = input_ids[i, p : p + r]
        mask[i, : p + r] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def lora_model() -> torch.nn.Module:
    model = tiny_llama(dtype=torch.float64)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize(
    "prompts, responses",
    [([5], [3]), ([7, 4], [2, 6]), ([0], [9]), ([1, 3], [4, 1])],  # one row, rows of other lengths, from position 0
)
def test_response_loss_and_its_gradient_equal_the_full_loss(prompts, responses):
    model = lora_model()
    rows = batch(prompts, responses)
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**rows).loss
    kept = response_loss(model, **rows)
    # Both compute the cross-entropy in float32 (Hugging Face upcasts logits to float32 even for float64 models),
    # summed in another order: equal to float32 rounding.
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(kept, params), torch.autograd.grad(full, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_response_loss_computes_logits_only_from_the_response():
    model = lora_model()
    widths = []
    model.base_model.model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    response_loss(model, **batch([7, 4], [2, 6]))
    assert widths == [10 - 3]  # the widest row has 10 tokens; position 3 predicts the first labelled token (4)


class NoLogitsToKeep(LlamaForCausalLM):
    """A model whose forward has no ``logits_to_keep`` (older or custom architectures)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_response_loss_falls_back_to_the_full_loss():
    base = tiny_llama(dtype=torch.float64)
    model = NoLogitsToKeep(base.config).to(torch.float64)
    model.load_state_dict(base.state_dict())
    rows = batch([5, 2], [3, 4])
    torch.testing.assert_close(response_loss(model, **rows), base(**rows).loss, rtol=0, atol=0)  # the same path


def weighted_reference(model: torch.nn.Module, rows: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * ce) / sum(w)`` over the labelled tokens, from the full logits."""
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1].float()
    targets = rows["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    w = weights[:, 1:] * (targets != -100)
    return (ce * w).sum() / w.sum()


def test_label_weights_give_the_weighted_mean_and_equal_weights_the_plain_one():
    model = lora_model()
    rows = batch([3, 6], [5, 2])
    weights = torch.rand(rows["labels"].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    weighted = response_loss(model, **rows, label_weights=weights)
    torch.testing.assert_close(weighted, weighted_reference(model, rows, weights), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(weighted, response_loss(model, **rows))  # the weights count
    twos = torch.full(rows["labels"].shape, 2.0)
    torch.testing.assert_close(response_loss(model, **rows, label_weights=twos), response_loss(model, **rows))


def test_label_weights_without_logits_to_keep():
    base = tiny_llama(dtype=torch.float64)
    model = NoLogitsToKeep(base.config).to(torch.float64)
    model.load_state_dict(base.state_dict())
    rows = batch([5, 2], [3, 4])
    weights = torch.arange(rows["labels"].numel(), dtype=torch.float32).reshape(rows["labels"].shape) + 1
    torch.testing.assert_close(
        response_loss(model, **rows, label_weights=weights), weighted_reference(base, rows, weights),
        rtol=1e-6, atol=1e-7,
    )
