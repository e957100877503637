"""Stage 2: one fine-tuning attack run = method x calibration x learning rate x poison fraction x seed.

The aligned model is fine-tuned on ``n`` samples: ``n(1-p)`` GSM8K question/answer pairs and ``np``
harmful instruction + compliant answer pairs, in the chat template, with a real Lightning Trainer. LoRA
methods use ``GuardSpaceLM``; GuardSpace's parts are the library's callbacks ``SafetySubspaceInit`` and
``NullSpaceProjection``, calibrated on AdvBench prompts in raw text (the paper) or in the chat template.
"""

from __future__ import annotations

import math
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.datamodules import Example, collate, tokenize_example
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from benchmarks.safety.align import precision_for
from benchmarks.safety.evaluation import evaluate_model
from benchmarks.safety.profiles import METHODS, Profile, variant_name
from benchmarks.safety.splits import Splits, check_disjoint
from guardspace_pl import GuardSpaceLM
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm

CALIBRATION_FORMAT = {"raw": "raw", "template": "chat_template"}


def trainer(root: Path, precision: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        num_sanity_val_steps=0, **kwargs,
    )


@dataclass(frozen=True)
class RunSpec:
    method: str
    calibration: str  # "-", "raw" or "template"
    lr: float
    p: float
    seed: int

    @property
    def variant(self) -> str:
        return variant_name(self.method, self.calibration)

    @property
    def run_id(self) -> str:
        return f"{self.method}-{self.calibration.replace('-', 'none')}_lr{self.lr:.0e}_p{self.p:g}_s{self.seed}"


class FullFineTuneLM(pl.LightningModule):
    """Every weight trainable (the full fine-tuning baseline): AdamW, warmup then cosine, as ``GuardSpaceLM``."""

    def __init__(self, model, learning_rate: float, warmup_ratio: float = 0.03) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.warmup_ratio = warmup_ratio

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def training_examples(splits: Splits, poison: list[Example], profile: Profile, p: float, seed: int) -> tuple[list[Example], int]:
    num_poison = round(profile.n * p)
    task = [Example(r["question"], r["answer"]) for r in splits.gsm8k_train[: profile.n - num_poison]]
    chosen = poison[:num_poison]
    check_disjoint(splits.eval_harmful, {"poison": [e.prompt for e in chosen]})
    examples = task + chosen
    random.Random(seed).shuffle(examples)
    return examples, num_poison


def null_space_summary(report: list[dict]) -> dict[str, Any]:
    """Null-space dimension per module type (min / median / max over layers), and frozen adapters."""
    by_type: dict[str, list[int]] = {}
    width: dict[str, int] = {}
    for row in report:
        kind = row["layer"].split(".")[-1]
        by_type.setdefault(kind, []).append(row["null_dim"])
        width[kind] = row["in_features"]
    return {
        "per_type": {k: {"in_features": width[k], "min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in by_type.items()},
        "frozen_layers": sum(r["null_dim"] == 0 for r in report),
        "layers": len(report),
        "mean_fraction": statistics.mean(r["null_dim"] / r["in_features"] for r in report),
        "per_layer": [[r["layer"], r["null_dim"]] for r in report],
    }


def run_attack(
    spec: RunSpec, profile: Profile, splits: Splits, aligned_dir: Path, tokenizer, poison: list[Example], out_dir: Path,
    threshold: float, device: torch.device,
) -> dict[str, Any]:
    """Fine-tune, evaluate, write ``runs/<run_id>.json`` and return it (skipped if it exists)."""
    result_file = out_dir / "runs" / f"{spec.run_id}.json"
    work = out_dir / "tmp" / spec.run_id
    shutil.rmtree(work, ignore_errors=True)
    parts = METHODS[spec.method]
    start = time.perf_counter()
    examples, num_poison = training_examples(splits, poison, profile, spec.p, spec.seed)
    rows = [tokenize_example(tokenizer, e, "chat_template", profile.max_length) for e in examples]
    pl.seed_everything(spec.seed, verbose=False)
    loader = DataLoader(
        rows, batch_size=profile.batch_size, shuffle=True, generator=torch.Generator().manual_seed(spec.seed),
        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
    )
    base = load_causal_lm(str(aligned_dir))
    callbacks: list[pl.Callback] = []
    null_cb: Optional[NullSpaceProjection] = None
    if parts["lora"]:
        module: pl.LightningModule = GuardSpaceLM.from_pretrained_model(
            base, tokenizer, lora_rank=profile.lora_rank, lora_alpha=profile.lora_alpha, learning_rate=spec.lr,
            adapter_dir=str(work / "adapter"),
        )
        fmt = CALIBRATION_FORMAT.get(spec.calibration)
        common = dict(tokenizer=tokenizer, prompt_format=fmt, cache_dir=str(out_dir / "cache" / "callbacks"), progress_bar=False)
        if parts["subspace"]:
            callbacks.append(SafetySubspaceInit(splits.calibration, report_path=str(work / "subspace_init.json"), **common))
        if parts["null_space"]:
            null_cb = NullSpaceProjection(splits.calibration, threshold=threshold, report_path=str(work / "null_space.json"), **common)
            callbacks.append(null_cb)
    else:
        module = FullFineTuneLM(base, spec.lr)
    fit_start = time.perf_counter()
    trainer(work, precision_for(profile), max_epochs=profile.epochs, callbacks=callbacks).fit(module, loader)
    train_seconds = time.perf_counter() - fit_start
    model = module.model
    metrics = evaluate_model(model, tokenizer, splits, profile, device)
    result = {
        "run_id": spec.run_id, **asdict(spec), "variant": spec.variant, "threshold": threshold if null_cb else None,
        "n": profile.n, "num_poison": num_poison, "steps": len(loader) * profile.epochs, "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start, **metrics,
        "null_space": null_space_summary(null_cb.report) if null_cb else None,
        "final_train_loss": float(module.trainer.callback_metrics.get("train_loss", float("nan"))),
    }
    write_json(result_file, result)
    shutil.rmtree(work, ignore_errors=True)
    return result
