"""Evaluation of one model: harmful score per source and pooled, over-refusal on two sets, GSM8K loss and accuracy.

Two depths (the cost rule of the CPU profile): every run gets the VALIDATION metrics (the small validation sets,
used to choose learning rates); matched picks get the FULL evaluation (held-out sets, each rate with its 95 %
Wilson interval, GSM8K exact match). Generation is batched and length-sorted by the library.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from benchmarks.safety.profiles import Profile
from benchmarks.safety.splits import Splits
from guardspace_pl.evaluation import KeywordRefusalJudge, generate_responses, gsm8k_exact_match, teacher_forced_loss
from guardspace_pl.evaluation.intervals import wilson_interval

FORMAT = "chat_template"  # the model is aligned, attacked and served in its chat template


def greedy_answers(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """The library's ``generate_responses`` in the benchmark's format (it sorts batches by length itself)."""
    return generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        prompt_format=FORMAT,
        show_progress=False,
    )


def task_loss(model: nn.Module, tokenizer, rows: Sequence[dict[str, str]], batch_size: int) -> float:
    """The library's ``teacher_forced_loss`` of the reference answers."""
    return teacher_forced_loss(
        model,
        tokenizer,
        [r["question"] for r in rows],
        [r["answer"] for r in rows],
        prompt_format=FORMAT,
        batch_size=batch_size,
    )


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    """A percentage with its count and 95 % Wilson interval."""
    hits, n = sum(map(bool, flags)), len(flags)
    low, high = wilson_interval(hits, n)
    return {"percent": 100.0 * hits / max(1, n), "count": hits, "n": n, "ci95": [100.0 * low, 100.0 * high]}


def _rates(
    model: nn.Module, tokenizer, harmful: Mapping[str, list[str]], safe: Mapping[str, list[str]], profile: Profile
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[dict[str, str]]]]:
    """Harmful rates per source and pooled, refusal rates per safe set, and the responses."""
    judge = KeywordRefusalJudge()
    sets = {**{f"harmful/{k}": v for k, v in harmful.items()}, **{f"safe/{k}": v for k, v in safe.items()}}
    prompts = [p for group in sets.values() for p in group]
    responses = greedy_answers(model, tokenizer, prompts, profile.judge_tokens, profile.gen_batch_size)
    by_set, i = {}, 0
    for name, group in sets.items():
        by_set[name] = responses[i : i + len(group)]
        i += len(group)
    harmful_rates: dict[str, Any] = {}
    pooled: list[bool] = []
    for source, group in harmful.items():
        flags = judge.harmful_flags(group, by_set[f"harmful/{source}"])
        harmful_rates[source] = rate(flags)
        pooled += flags
    harmful_rates["pooled"] = rate(pooled)
    refusal_rates = {name: rate(judge.refusal_flags(by_set[f"safe/{name}"])) for name in safe}
    samples = {name: [{"prompt": p, "response": r} for p, r in zip(sets[name], by_set[name])] for name in sets}
    return harmful_rates, refusal_rates, samples


@torch.no_grad()
def validate(model: nn.Module, tokenizer, splits: Splits, profile: Profile, device: torch.device) -> dict[str, Any]:
    """Validation metrics only: what learning rates are chosen on."""
    start = time.perf_counter()
    model = model.to(device).eval()
    harmful, refusal, _ = _rates(model, tokenizer, splits.val_harmful, splits.val_safe, profile)
    return {
        "val_harmful": harmful, "val_refusal": refusal,
        "val_harmful_score": harmful["pooled"]["percent"],
        "val_over_refusal": refusal["xstest"]["percent"],
        "val_task_loss": task_loss(model, tokenizer, splits.gsm8k_val, profile.gen_batch_size),
        "val_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate_full(
    model: nn.Module, tokenizer, splits: Splits, profile: Profile, device: torch.device
) -> dict[str, Any]:
    """The held-out evaluation of a matched pick."""
    start = time.perf_counter()
    model = model.to(device).eval()
    harmful, refusal, samples = _rates(model, tokenizer, splits.eval_harmful, splits.eval_safe, profile)
    questions = [r["question"] for r in splits.gsm8k_accuracy]
    predictions = greedy_answers(model, tokenizer, questions, profile.accuracy_tokens, profile.gen_batch_size)
    accuracy = rate([gsm8k_exact_match(p, r["answer"]) for p, r in zip(predictions, splits.gsm8k_accuracy)])
    metrics: dict[str, Any] = {
        "judge": KeywordRefusalJudge.name,
        "harmful": harmful, "refusal": refusal,
        "harmful_score": harmful["pooled"]["percent"],
        "over_refusal": refusal["xstest"]["percent"],
        "harmless_refusal": refusal["harmless"]["percent"],
        "task_loss": task_loss(model, tokenizer, splits.gsm8k_test, profile.gen_batch_size),
        "accuracy": accuracy["percent"], "accuracy_detail": accuracy,
        "eval_seconds": time.perf_counter() - start,
        "samples": {name: rows[:20] for name, rows in samples.items()}
        | {"gsm8k": [{"question": q, "prediction": p} for q, p in zip(questions[:4], predictions[:4])]},
    }
    return metrics
