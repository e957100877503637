"""Stage 1: give SmolLM2-135M-Instruct a safety alignment with a merged LoRA refusal patch.

The patch is made by the library's own workflow (``guardspace_pl.align``, the ``align`` subcommand): harmful
instructions and XSTest's unsafe contrast prompts -> a refusal (several phrasings); harmless instructions and
borderline safe prompts (XSTest, never evaluated) -> the original model's own answers, generated once and cached.
The splits' prompts are written to JSONL files that the ``SafetyPatchDataModule`` reads; the patch is then merged
with ``apply_patches`` and saved, so every attack run starts from the same aligned weights.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from guardspace_pl.datamodules import Example

from benchmarks.safety.profiles import Profile
from benchmarks.safety.splits import Splits
from guardspace_pl.evaluation import KeywordRefusalJudge
from guardspace_pl.evaluation.answer_cache import cached_greedy_answers
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm


def poison_pairs(model, tokenizer, splits: Splits, profile: Profile, cache: Path) -> list[Example]:
    """Harmful instruction + compliant answer: the unaligned model's own answer, or AdvBench's target if it refused."""
    judge = KeywordRefusalJudge()
    prompts = [r["prompt"] for r in splits.poison]
    answers = cached_greedy_answers(model, tokenizer, prompts, profile.poison_answer_tokens, cache, profile.gen_batch_size)
    pairs = []
    for own, source in zip(answers, splits.poison):
        answer = own.answer
        if not answer or judge.is_refusal(answer):
            answer = source["target"] + "."
        pairs.append(Example(source["prompt"], answer))
    return pairs


def precision_for(profile: Profile) -> str:
    return profile.precision_gpu if torch.cuda.is_available() else "32-true"


def _write_prompts(path: Path, prompts: list[str]) -> dict[str, Any]:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"source": str(path), "shuffle_seed": None}


def align_config(original_dir: str, splits: Splits, profile: Profile, cache_dir: Path, seed: int) -> dict[str, Any]:
    """The ``align`` config of this benchmark's patch: the splits' prompts, the profile's sizes, no report."""
    prompts = cache_dir / "align_prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "harmful": [_write_prompts(prompts / "harmful.jsonl", splits.align_harmful)],  # contrast prompts included
        "harmless": [_write_prompts(prompts / "harmless.jsonl", splits.align_harmless)],
        "answer_tokens": profile.align_answer_tokens,
        "generation_batch_size": profile.gen_batch_size,
        "cache_dir": str(cache_dir / "own_answers"),
        "max_length": profile.max_length,
        "batch_size": profile.batch_size,
        "seed": seed,
    }
    if splits.align_borderline:
        data["borderline"] = [_write_prompts(prompts / "borderline.jsonl", splits.align_borderline)]
    return {
        "seed_everything": seed,
        "output_dir": str(cache_dir / "alignment"),
        "kind": "adapter",
        "model": {"model_name_or_path": original_dir, "lora_rank": profile.align_rank,
                  "lora_alpha": 2.0 * profile.align_rank, "learning_rate": profile.align_lr},
        "data": data,
        "trainer": {"accelerator": "auto", "devices": 1, "precision": precision_for(profile),
                    "max_epochs": profile.align_epochs, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(cache_dir / "alignment_logs")},
        "report": {"enabled": False},  # the benchmark evaluates the aligned model itself
    }


def align(original_dir: str, tokenizer, splits: Splits, profile: Profile, cache_dir: Path, seed: int = 0) -> tuple[Path, dict]:
    """Train the patch with ``align``, merge and save it; returns the aligned model folder and what was done."""
    from guardspace_pl.align import main as align_main
    from guardspace_pl.patches import apply_patches

    target = cache_dir / "aligned_model"
    info_file = cache_dir / "alignment.json"
    settings = {k: v for k, v in profile.to_dict().items() if k.startswith("align_") or k in ("max_length", "batch_size")}
    settings["seed"] = seed
    settings["workflow"] = "guardspace_pl.align"
    if (target / "config.json").exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("settings") == settings:
            return target, info
        print(f"The cached aligned model in {target} was trained with other settings: training it again.", flush=True)
    start = time.perf_counter()
    config_file = cache_dir / "align.yaml"
    config_file.write_text(yaml.safe_dump(align_config(original_dir, splits, profile, cache_dir, seed), sort_keys=False))
    report = align_main(["--config", str(config_file)])
    merged = apply_patches(load_causal_lm(original_dir), [report["patch"]], mode="merged")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    data, training = report["data"], report["training"]
    info = {
        "settings": settings, "config": str(config_file), "patch": report["patch"],
        "harmful_examples": data["harmful"] + data["contrast"], "harmless_examples": data["harmless"] + data["borderline"],
        "borderline_prompts": len(splits.align_borderline),
        "harmless_dropped_original_refused": data["harmless_dropped_refused_by_original"]
        + data["borderline_dropped_refused_by_original"],
        "harmless_answers_unfinished": data["unfinished_answers"], "refusal_phrasings": data["refusal_phrasings"],
        "epochs": profile.align_epochs, "lr": profile.align_lr, "rank": profile.align_rank, "alpha": 2.0 * profile.align_rank,
        "steps": training["steps"], "answer_tokens": profile.align_answer_tokens,
        "train_seconds": training["seconds"], "seconds": time.perf_counter() - start,
    }
    write_json(info_file, info)
    return target, info
