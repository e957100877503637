"""One evaluation of a model: harmful score, over-refusal, GSM8K loss and accuracy, on eval and validation sets."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from benchmarks.safety.profiles import Profile
from benchmarks.safety.splits import Splits
from guardspace_pl.evaluation import (
    KeywordRefusalJudge,
    generate_responses,
    gsm8k_exact_match,
    harmful_score,
    teacher_forced_loss,
)

FORMAT = "chat_template"  # the model is aligned, attacked and served in its chat template


def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The library's ``generate_responses`` in the benchmark's format (it sorts batches by length itself)."""
    return generate_responses(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_format=FORMAT, show_progress=False
    )


def task_loss(model: nn.Module, tokenizer, rows: Sequence[dict[str, str]], batch_size: int) -> float:
    """The library's ``teacher_forced_loss`` of the reference answers."""
    return teacher_forced_loss(
        model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], prompt_format=FORMAT, batch_size=batch_size
    )


def percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(map(bool, flags)) / max(1, len(flags))


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer, splits: Splits, profile: Profile, device: torch.device) -> dict[str, Any]:
    """Every metric of one model; ``val_*`` come from validation prompts only (used to choose settings)."""
    start = time.perf_counter()
    model = model.to(device).eval()
    judge = KeywordRefusalJudge()
    sets = {"eval_harmful": splits.eval_harmful, "val_harmful": splits.val_harmful, "xstest_eval": splits.xstest_eval, "xstest_val": splits.xstest_val}
    prompts = [p for group in sets.values() for p in group]
    responses = greedy_answers(model, tokenizer, prompts, profile.judge_tokens, profile.gen_batch_size)
    by_set, i = {}, 0
    for name, group in sets.items():
        by_set[name] = responses[i : i + len(group)]
        i += len(group)
    metrics: dict[str, Any] = {
        "judge": judge.name,
        "harmful_score": harmful_score(judge, splits.eval_harmful, by_set["eval_harmful"]),
        "val_harmful_score": harmful_score(judge, splits.val_harmful, by_set["val_harmful"]),
        "over_refusal": percent(judge.refusal_flags(by_set["xstest_eval"])),
        "val_over_refusal": percent(judge.refusal_flags(by_set["xstest_val"])),
        "task_loss": task_loss(model, tokenizer, splits.gsm8k_test, profile.gen_batch_size),
        "val_task_loss": task_loss(model, tokenizer, splits.gsm8k_val, profile.gen_batch_size),
    }
    questions = [r["question"] for r in splits.gsm8k_accuracy]
    predictions = greedy_answers(model, tokenizer, questions, profile.accuracy_tokens, profile.gen_batch_size)
    metrics["accuracy"] = percent([gsm8k_exact_match(p, r["answer"]) for p, r in zip(predictions, splits.gsm8k_accuracy)])
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["samples"] = {
        "eval_harmful": [{"prompt": p, "response": r} for p, r in zip(splits.eval_harmful, by_set["eval_harmful"])],
        "xstest_eval": [{"prompt": p, "response": r} for p, r in zip(splits.xstest_eval, by_set["xstest_eval"])],
        "gsm8k": [{"question": q, "prediction": p} for q, p in zip(questions[:4], predictions[:4])],
    }
    return metrics
