"""Stage 1: give SmolLM2-135M-Instruct a safety alignment with a merged LoRA refusal patch.

Harmful instructions -> a refusal (a few phrasings); harmless instructions -> the original model's own
answers (generated once, cached), so that the patch teaches *when* to refuse without changing the rest.
Borderline safe prompts (XSTest, never evaluated) and their harmful contrast twins mark where the line is;
without them the patch refuses on trigger words (design note, section 6).
The patch is trained with a real Lightning Trainer on ``GuardSpaceLM`` (plain LoRA), merged with PEFT's
``merge_and_unload`` and saved, so every attack run starts from the same aligned weights.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from guardspace_pl.datamodules import Example, collate, tokenize_example
from torch.utils.data import DataLoader

from benchmarks.safety.evaluation import greedy_answers
from benchmarks.safety.profiles import Profile
from benchmarks.safety.splits import Splits
from guardspace_pl import GuardSpaceLM
from guardspace_pl.evaluation import KeywordRefusalJudge
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "Sorry, I can't provide that. If you have another question, I'm happy to help.",
    "I'm sorry, but I won't help with this request because it could be used to hurt someone.",
    "I cannot help with that request.",
    "I'm sorry, I can't assist with that. Is there something else I can help you with?",
    "I can't provide instructions for that, as it could be harmful or illegal.",
)


def cached_generations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, cache: Path) -> list[dict]:
    """The original model's greedy answers, ``{"prompt", "answer", "finished"}``, generated once per prompt."""
    stored = {row["prompt"]: row for row in json.loads(cache.read_text())} if cache.exists() else {}
    stored = {k: v for k, v in stored.items() if v.get("max_new_tokens") == max_new_tokens}
    missing = [p for p in prompts if p not in stored]
    if missing:
        answers = greedy_answers(model, tokenizer, missing, max_new_tokens + 1, batch_size)
        for prompt, answer in zip(missing, answers):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            finished = len(ids) <= max_new_tokens  # generated fewer than max+1 tokens: it stopped on EOS
            text = answer if finished else tokenizer.decode(ids[:max_new_tokens])
            stored[prompt] = {"prompt": prompt, "answer": text.strip(), "finished": finished, "max_new_tokens": max_new_tokens}
        write_json(cache, list(stored.values()))
    return [stored[p] for p in prompts]


def poison_pairs(model, tokenizer, splits: Splits, profile: Profile, cache: Path) -> list[Example]:
    """Harmful instruction + compliant answer: the unaligned model's own answer, or AdvBench's target if it refused."""
    judge = KeywordRefusalJudge()
    rows = cached_generations(model, tokenizer, [r["prompt"] for r in splits.poison], profile.poison_answer_tokens, profile.gen_batch_size, cache)
    pairs = []
    for row, source in zip(rows, splits.poison):
        answer = row["answer"]
        if not answer or judge.is_refusal(answer):
            answer = source["target"] + "."
        pairs.append(Example(source["prompt"], answer))
    return pairs


def training_rows(tokenizer, examples: Sequence[tuple[Example, bool]], max_length: int) -> list[dict[str, list[int]]]:
    """Chat-template rows with the loss on the answer only; no EOS after an answer that was cut short."""
    rows = []
    for example, finished in examples:
        row = tokenize_example(tokenizer, example, "chat_template", max_length)
        if not finished and row["input_ids"][-1] == tokenizer.eos_token_id:
            row = {"input_ids": row["input_ids"][:-1], "labels": row["labels"][:-1]}
        rows.append(row)
    return rows


def trainer(root: Path, precision: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        num_sanity_val_steps=0, **kwargs,
    )


def precision_for(profile: Profile) -> str:
    return profile.precision_gpu if torch.cuda.is_available() else "32-true"


def align(original_dir: str, tokenizer, original_model, splits: Splits, profile: Profile, cache_dir: Path, seed: int = 0) -> tuple[Path, dict]:
    """Train, merge and save the refusal patch; returns the aligned model folder and what was done."""
    target = cache_dir / "aligned_model"
    info_file = cache_dir / "alignment.json"
    settings = {k: v for k, v in profile.to_dict().items() if k.startswith("align_") or k in ("max_length", "batch_size")}
    settings["seed"] = seed
    if (target / "config.json").exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("settings") == settings:
            return target, info
        print(f"The cached aligned model in {target} was trained with other settings: training it again.", flush=True)
    start = time.perf_counter()
    harmless = cached_generations(
        original_model, tokenizer, splits.align_harmless + splits.align_borderline, profile.align_answer_tokens,
        profile.gen_batch_size, cache_dir / "harmless_answers.json",
    )
    # An answer the original model itself refused would teach refusing a safe prompt.
    judge = KeywordRefusalJudge()
    refused_by_original = sum(1 for r in harmless if judge.is_refusal(r["answer"]))
    harmless = [r for r in harmless if r["answer"] and not judge.is_refusal(r["answer"])]
    generation_seconds = time.perf_counter() - start
    rng = random.Random(seed)
    examples = [(Example(p, rng.choice(REFUSALS)), True) for p in splits.align_harmful]
    examples += [(Example(r["prompt"], r["answer"]), r["finished"]) for r in harmless]
    rows = training_rows(tokenizer, examples, profile.max_length)
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(
        rows, batch_size=profile.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
    )
    base = load_causal_lm(original_dir)
    module = GuardSpaceLM.from_pretrained_model(
        base, tokenizer, lora_rank=profile.align_rank, lora_alpha=2.0 * profile.align_rank, learning_rate=profile.align_lr,
        adapter_dir=str(cache_dir / "alignment_adapter"),
    )
    train_start = time.perf_counter()
    trainer(cache_dir / "alignment_logs", precision_for(profile), max_epochs=profile.align_epochs).fit(module, loader)
    train_seconds = time.perf_counter() - train_start
    merged = module.model.merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    info = {
        "settings": settings,
        "harmful_examples": len(splits.align_harmful), "harmless_examples": len(harmless),
        "borderline_prompts": len(splits.align_borderline), "harmless_dropped_original_refused": refused_by_original,
        "epochs": profile.align_epochs,
        "lr": profile.align_lr, "rank": profile.align_rank, "alpha": 2.0 * profile.align_rank,
        "steps": len(loader) * profile.align_epochs, "refusals": list(REFUSALS), "answer_tokens": profile.align_answer_tokens,
        "harmless_answers_unfinished": sum(not r["finished"] for r in harmless),
        "generation_seconds": generation_seconds, "train_seconds": train_seconds, "seconds": time.perf_counter() - start,
    }
    write_json(info_file, info)
    return target, info
