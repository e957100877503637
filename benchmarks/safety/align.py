"""Stage 1: give SmolLM2-135M-Instruct a safety alignment with a merged LoRA refusal patch.

The patch is made by the library's own workflow (``guardspace_pl.align``, the ``align`` subcommand) with the
shipped config ``configs/safety_patch_smollm2.yaml`` (measured in BENCHMARKS.md, "Safety patch"): harmful
instructions and XSTest's unsafe contrast prompts -> a refusal (several phrasings); harmless instructions and
borderline safe prompts (XSTest rows never evaluated) -> the original model's own answers. The patch is then
merged with ``apply_patches`` and saved, so every attack run starts from the same aligned weights.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from benchmarks.safety.profiles import Profile
from benchmarks.safety.splits import Splits, align_config
from guardspace_pl.datamodules import Example
from guardspace_pl.evaluation import KeywordRefusalJudge
from guardspace_pl.evaluation.answer_cache import cached_greedy_answers
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm


def poison_pairs(model, tokenizer, splits: Splits, profile: Profile, cache: Path) -> list[Example]:
    """Harmful instruction + compliant answer: the unaligned model's own answer, or AdvBench's target if it refused."""
    judge = KeywordRefusalJudge()
    prompts = [r["prompt"] for r in splits.poison]
    answers = cached_greedy_answers(
        model, tokenizer, prompts, profile.poison_answer_tokens, cache, profile.gen_batch_size
    )
    pairs = []
    for own, source in zip(answers, splits.poison):
        answer = own.answer
        if not answer or judge.is_refusal(answer):
            answer = source["target"] + "."
        pairs.append(Example(source["prompt"], answer))
    return pairs


def precision_for(profile: Profile) -> str:
    return profile.precision_gpu if torch.cuda.is_available() else "32-true"


def patch_config(profile: Profile, data_dir: Path, cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """The ``align`` config of the aligned start: the shipped SmolLM2 patch config (with the profile's overrides),
    its held-out sets and report left out (the benchmark evaluates the aligned model itself)."""
    config = align_config(profile, data_dir)
    config["seed_everything"] = seed
    config["output_dir"] = str(cache_dir / "alignment")
    config["kind"] = "adapter"
    config["data"].pop("evaluation", None)
    config["data"]["cache_dir"] = str(cache_dir / "own_answers")
    config["data"]["generation_batch_size"] = profile.gen_batch_size
    config["trainer"].update(
        precision=precision_for(profile), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(cache_dir / "alignment_logs"),
    )
    config["report"] = {"enabled": False}
    return config


def align(
    original_dir: str,
    tokenizer,
    profile: Profile,
    data_dir: Path,
    cache_dir: Path,
    patch: Optional[Path] = None,
    seed: int = 0,
) -> tuple[Path, dict]:
    """Train the patch with ``align`` (or take ``patch``, trained by the same config), merge and save it; returns the
    aligned model folder and what was done. Cached: a rerun with the same config reuses the aligned model."""
    from guardspace_pl.align import main as align_main
    from guardspace_pl.patches import apply_patches

    target = cache_dir / "aligned_model"
    info_file = cache_dir / "alignment.json"
    config = patch_config(profile, data_dir, cache_dir, seed)
    if (target / "config.json").exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("config") == config:
            return target, info
        print(f"The cached aligned model in {target} was made with another config: making it again.", flush=True)
    start = time.perf_counter()
    patch_dir = cache_dir / "alignment" / "patch"
    training: dict[str, Any] = {}
    if patch is not None:
        shutil.rmtree(patch_dir, ignore_errors=True)
        shutil.copytree(patch, patch_dir)
        origin = f"given with --patch ({patch}); trained by the same config"
    else:
        config_file = cache_dir / "align.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        report = align_main(["--config", str(config_file)])
        training = {"data": report["data"], "training": report["training"]}
        origin = "trained here by python -m guardspace_pl align"
    merged = apply_patches(load_causal_lm(original_dir), [str(patch_dir)], mode="merged")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    info = {
        "config": config,
        "patch": str(patch_dir),
        "origin": origin,
        **training,
        "seconds": time.perf_counter() - start,
    }
    write_json(info_file, info)
    return target, info
