"""Greedy generation, teacher-forced answer loss, and the safety / GSM8K evaluations built on them."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from guardspace_pl.distributed import reshard, world_size
from guardspace_pl.evaluation.accuracy import gsm8k_exact_match
from guardspace_pl.evaluation.judges import Judge, KeywordRefusalJudge
from guardspace_pl.prompts import PromptFormat, format_prompt


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face / PEFT model inside a ``GuardSpaceLM`` (or the model itself)."""
    if hasattr(model, "generate"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "generate"):
        return inner
    raise TypeError(
        f"{type(model).__name__} has no .generate(); pass a Hugging Face causal LM, a PEFT model, or a GuardSpaceLM "
        "whose model is built (call configure_model() or fit first)."
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_sharded_generation(model: nn.Module) -> bool:
    """Under FSDP2, make ``generate`` gather parameters as ``forward`` does; True when ``model`` holds FSDP2 modules.

    ``generate()`` bypasses the forward of the FSDP2 module it is called on, whose pre-forward hook gathers that
    module's own parameters (embeddings, norm, head): it is registered as a forward method (once) on every FSDP2
    module in ``model`` that has one.

    Args:
        model: a Hugging Face causal LM or PEFT model, sharded or not.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        # An instance attribute means it is registered already: a second wrapper would gather and free twice.
        if callable(getattr(type(module), "generate", None)) and "generate" not in vars(module):
            register_fsdp_forward_method(module, "generate")
    return bool(sharded)


def _check_inputs(prompts: Sequence[str], batch_size: int, what: str = "prompts") -> None:
    if isinstance(prompts, str):
        raise TypeError(f"{what} must be a list of strings, not one string; wrap it: [{what[:-1]}].")
    if len(prompts) == 0:
        raise ValueError(f"{what} is empty; pass at least one.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")


@contextmanager
def _inference(model: nn.Module, tokenizer: PreTrainedTokenizerBase, padding_side: str) -> Iterator[None]:
    """Eval mode, no grad and the given padding side; the caller's settings come back afterwards."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token, so prompts cannot be batched; set tokenizer.pad_token = "
            "tokenizer.eos_token (or add a pad token) first."
        )
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = padding_side
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = old_side


def greedy_new_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """Greedy decoding of left-padded prompts; returns only the generated tokens.

    ``synced_gpus``: every rank keeps stepping until all are done, so sharded models never all-gather alone.
    """
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        synced_gpus=synced_gpus,
    )
    return output[:, input_ids.shape[1] :]


def generate_from_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    add_special_tokens: bool,
    max_new_tokens: int,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy completions of already formatted prompt texts as one left-padded batch, without the prompts.

    The one generation routine of the library: ``generate_responses``, ``GuardSpaceLM.test`` and the benchmarks call
    it. The model's train/eval mode and the tokenizer's padding side are restored afterwards.

    A model sharded with FSDP2 is a collective: every rank must call this, and generation runs in lock-step.

    Args:
        model: a Hugging Face causal LM or PEFT model.
        tokenizer: its tokenizer (needs a pad token).
        texts: prompt texts as the model should see them (chat template already applied, if any).
        add_special_tokens: whether the tokenizer adds BOS/EOS (False when a chat template already carries them).
        max_new_tokens: greedy tokens per prompt.
        synced_gpus: every rank keeps stepping until all are done (sharded models must not all-gather alone); always
            on for a model sharded over several ranks.
    """
    synced_gpus = synced_gpus or (prepare_sharded_generation(model) and world_size() > 1)
    with _inference(model, tokenizer, padding_side="left"):  # every row's prompt ends where generation starts
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        batch = batch.to(_device(model))
        new_tokens = greedy_new_tokens(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens, tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )
    reshard(model)  # FSDP2 keeps the root's parameters gathered after generate(): shard them again
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def length_order(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Indices that sort ``texts`` by token count: batches of similar length waste little compute on padding.

    Args:
        tokenizer: the tokenizer that counts tokens.
        texts: the texts to order.
    """
    return sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))


def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prompt_format: PromptFormat = "chat_template",
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions, one per prompt and in the prompts' order, without the prompt and special tokens.

    Prompts are generated in length-sorted batches (less padding), then put back in their order.

    Args:
        model: a Hugging Face causal LM, a PEFT model, or a GuardSpaceLM.
        tokenizer: its tokenizer.
        prompts: plain prompts (the format is applied here).
        max_new_tokens: greedy tokens per prompt.
        batch_size: prompts per generation batch.
        prompt_format: ``"chat_template"`` or ``"raw"``.
        show_progress: show a progress bar over batches.
    """
    _check_inputs(prompts, batch_size)
    model = unwrap_model(model)
    texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts]
    order = length_order(tokenizer, texts)
    responses = [""] * len(texts)
    for start in tqdm(range(0, len(texts), batch_size), desc="Generating", disable=not show_progress):
        chunk = order[start : start + batch_size]
        # The chat template already carries the BOS token where the model wants one.
        outputs = generate_from_texts(
            model, tokenizer, [texts[i] for i in chunk], prompt_format == "raw", max_new_tokens
        )
        for i, output in zip(chunk, outputs):
            responses[i] = output
    return responses


def answer_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of the answer tokens (labels ``!= -100``); token ``t`` predicts token ``t + 1``.

    Returns ``(losses, keep)``, both ``[batch, length - 1]``: losses are zero where ``keep`` is False. Computed in
    float32 so that bf16 models report a comparable number. The one loss routine of the library's evaluation.

    Args:
        logits: the model's logits, ``[batch, length, vocab]``.
        labels: token ids of the answers and ``-100`` elsewhere, ``[batch, length]``.
    """
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != -100
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none") * keep
    return losses, keep


def _answer_batch(
    tokenizer: PreTrainedTokenizerBase, prompt_texts: Sequence[str], answers: Sequence[str], prompt_format: PromptFormat
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer ids with labels on the answer tokens only (-100 elsewhere)."""
    rows = []
    for prompt_text, answer in zip(prompt_texts, answers):
        prompt_ids = tokenizer(prompt_text, add_special_tokens=prompt_format == "raw")["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(answer_ids) == 0:
            raise ValueError(f"Answer {answer!r} encodes to no tokens; the loss over it is undefined.")
        rows.append((list(prompt_ids), list(answer_ids)))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def answer_token_losses_by_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    prompt_format: PromptFormat = "chat_template",
    batch_size: int = 8,
    show_progress: bool = False,
) -> Iterator[torch.Tensor]:
    """The cross-entropy of every answer token given its prompt (prompt tokens masked out), one tensor per batch."""
    _check_inputs(prompts, batch_size)
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt.")
    model = unwrap_model(model)
    texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts]
    order = length_order(tokenizer, [text + answer for text, answer in zip(texts, answers)])  # the mean ignores order
    with _inference(model, tokenizer, padding_side="right"):
        device = _device(model)
        for start in tqdm(range(0, len(texts), batch_size), desc="Scoring", disable=not show_progress):
            chunk = order[start : start + batch_size]
            batch = _answer_batch(tokenizer, [texts[i] for i in chunk], [answers[i] for i in chunk], prompt_format)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_losses, keep = answer_token_losses(logits, batch["labels"])
            yield token_losses[keep].cpu()


def teacher_forced_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    prompt_format: PromptFormat = "chat_template",
    batch_size: int = 8,
    show_progress: bool = False,
) -> float:
    """Mean per-token cross-entropy of the answers given the prompts (prompt tokens masked out)."""
    # Weighted by token count, so long answers count per token and not per example; NaNs propagate (not
    # dropped, the default) so that a broken model cannot report a good loss.
    mean = MeanMetric(nan_strategy="disable")
    for losses in answer_token_losses_by_batch(
        model, tokenizer, prompts, answers, prompt_format, batch_size, show_progress
    ):
        mean.update(losses)
    return float(mean.compute())


def _percent(flags: Sequence[bool]) -> float:
    """Percentage of true flags, through torchmetrics so the running mean could be synced across ranks."""
    metric = MeanMetric()
    metric.update(torch.tensor([float(f) for f in flags]))
    return 100.0 * float(metric.compute())


def evaluate_safety(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful_prompts: Sequence[str],
    safe_prompts: Optional[Sequence[str]],
    judge: Judge,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prompt_format: PromptFormat = "chat_template",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Harmful score (% flagged by ``judge``) on harmful prompts, and over-refusal (% keyword refusals) on safe ones.

    Returns ``harmful_score``, ``judge``, ``n_harmful``, ``harmful_responses`` and, when ``safe_prompts`` is
    given (e.g. XSTest's safe prompts), ``over_refusal``, ``refusal_judge`` (always ``"keyword"``), ``n_safe``,
    ``safe_responses``.
    """
    gen = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_format=prompt_format, show_progress=show_progress
    )
    harmful_responses = generate_responses(model, tokenizer, harmful_prompts, **gen)
    flags = judge.harmful_flags(harmful_prompts, harmful_responses)
    result: dict[str, Any] = {
        "harmful_score": _percent(flags),
        "judge": judge.name,
        "n_harmful": len(harmful_prompts),
        "harmful_responses": harmful_responses,
    }
    if safe_prompts is not None:
        refusal_judge = KeywordRefusalJudge()
        safe_responses = generate_responses(model, tokenizer, safe_prompts, **gen)
        result.update(
            over_refusal=_percent(refusal_judge.refusal_flags(safe_responses)),
            refusal_judge=refusal_judge.name,
            n_safe=len(safe_prompts),
            safe_responses=safe_responses,
        )
    return result


def evaluate_gsm8k(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prompt_format: PromptFormat = "chat_template",
    show_progress: bool = True,
) -> dict[str, Any]:
    """GSM8K exact-match accuracy (%) of greedy answers, and the teacher-forced loss of the reference solutions.

    Returns ``accuracy``, ``loss``, ``n`` and ``predictions``.
    """
    if len(questions) != len(answers):
        raise ValueError(f"Got {len(questions)} questions but {len(answers)} answers; pass GSM8K's pairs in order.")
    predictions = generate_responses(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
        prompt_format=prompt_format, show_progress=show_progress,
    )
    correct = [gsm8k_exact_match(p, a) for p, a in zip(predictions, answers)]
    loss = teacher_forced_loss(model, tokenizer, questions, answers, prompt_format=prompt_format, batch_size=batch_size)
    if not math.isfinite(loss):
        raise FloatingPointError(f"The teacher-forced loss is {loss}; the model's logits are not finite.")
    return {"accuracy": _percent(correct), "loss": loss, "n": len(questions), "predictions": predictions}
