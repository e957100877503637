"""Stage 2: fine-tuning attacks, post-hoc repairs, and the models they leave behind.

A training run (:class:`RunSpec`) fine-tunes the aligned model on ``n`` samples: ``n(1-p)`` GSM8K pairs and
``np`` harmful instruction + compliant answer pairs, in the chat template, with a real Lightning Trainer. The
methods are the library's own: ``GuardSpaceLM`` for LoRA, and the callbacks ``SafetySubspaceInit``,
``NullSpaceProjection``, ``AsFTRegularizer`` and ``SafetyGradientProjection``. Every run is measured on the
validation sets and its model is kept under ``states/`` (the PEFT adapter when the frozen weights are still the
aligned start's; the merged model after full fine-tuning or the subspace init), so a matched pick is evaluated in
full later without training again.

A post-hoc run (:class:`PosthocSpec`) takes a plain LoRA run's adapter and applies SafeLoRA, LSSF or the safety
patch again (``apply_patches``), each from the aligned start's patch as the safety reference.
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
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from benchmarks.safety.align import precision_for
from benchmarks.safety.profiles import METHODS, POSTHOC_SETTINGS, Profile, variant_name
from benchmarks.safety.splits import Splits, calibration_for, check_disjoint
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import (
    AsFTRegularizer,
    NullSpaceProjection,
    SafetyGradientProjection,
    SafetySubspaceInit,
)
from guardspace_pl.datamodules import Example, collate, tokenize_example
from guardspace_pl.loading import load_causal_lm

REFUSAL = "I'm sorry, but I can't help with that."  # the SPF safety samples' response


@dataclass(frozen=True)
class RunSpec:
    method: str
    calibration: str  # "-" or a name of profiles.CALIBRATIONS
    lr: float
    p: float
    seed: int
    weight: Optional[float] = None  # AsFT's lambda
    refresh_every: Optional[int] = None  # SPF's (None: the callback's default, 1)

    @property
    def variant(self) -> str:
        return variant_name(self.method, self.calibration, weight=self.weight, refresh_every=self.refresh_every)

    @property
    def run_id(self) -> str:
        tail = "" if self.weight is None else f"_l{self.weight:g}"
        tail += "" if self.refresh_every is None else f"_r{self.refresh_every}"
        return f"{self.method}-{self.calibration.replace('-', 'none')}_lr{self.lr:.0e}_p{self.p:g}_s{self.seed}{tail}"


@dataclass(frozen=True)
class PosthocSpec:
    base: RunSpec  # a plain LoRA run
    posthoc: str   # a name of profiles.POSTHOC_SETTINGS, e.g. "safelora-k10"

    @property
    def method(self) -> str:
        return self.base.method

    @property
    def lr(self) -> float:
        return self.base.lr

    @property
    def p(self) -> float:
        return self.base.p

    @property
    def seed(self) -> int:
        return self.base.seed

    @property
    def variant(self) -> str:
        return variant_name(self.base.method, self.base.calibration, self.posthoc)

    @property
    def run_id(self) -> str:
        return f"{self.base.run_id}+{self.posthoc}"


Spec = Union[RunSpec, PosthocSpec]


@dataclass
class Context:
    """What every run needs: the data, the aligned start and its patch, where to write."""

    profile: Profile
    splits: Splits
    aligned_dir: Path
    patch_dir: Path
    tokenizer: Any
    poison: list[Example]
    out: Path
    threshold: float
    device: torch.device

    def state_dir(self, run_id: str) -> Path:
        return self.out / "states" / run_id


def trainer(root: Path, precision: str, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
        num_sanity_val_steps=0, **kwargs,
    )


class FullFineTuneLM(pl.LightningModule):
    """Every weight trainable (the full fine-tuning baseline): AdamW, warmup then cosine, as ``GuardSpaceLM``."""

    def __init__(self, model, learning_rate: float, warmup_ratio: float = 0.03) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.warmup_ratio = warmup_ratio

    def training_step(self, batch, batch_idx):
        loss = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def training_examples(
    splits: Splits, poison: list[Example], profile: Profile, p: float, seed: int
) -> tuple[list[Example], int]:
    num_poison = round(profile.n * p)
    task = [Example(r["question"], r["answer"]) for r in splits.gsm8k_train[: profile.n - num_poison]]
    chosen = poison[:num_poison]
    check_disjoint([x for group in splits.eval_harmful.values() for x in group], {"poison": [e.prompt for e in chosen]})
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
        "per_type": {
            k: {"in_features": width[k], "min": min(v), "median": statistics.median(v), "max": max(v)}
            for k, v in by_type.items()
        },
        "frozen_layers": sum(r["null_dim"] == 0 for r in report),
        "layers": len(report),
        "mean_fraction": statistics.mean(r["null_dim"] / r["in_features"] for r in report),
    }


def _callbacks(spec: RunSpec, ctx: Context, work: Path) -> tuple[list[pl.Callback], Optional[NullSpaceProjection]]:
    """The library callbacks of ``spec.method``; SPF before the null-space projection (which must edit last)."""
    parts, profile = METHODS[spec.method], ctx.profile
    callbacks: list[pl.Callback] = []
    null_cb: Optional[NullSpaceProjection] = None
    if parts.calibrated:
        prompts, prompt_format = calibration_for(ctx.splits, spec.calibration)
        common = dict(
            tokenizer=ctx.tokenizer,
            prompt_format=prompt_format,
            cache_dir=str(ctx.out / "cache" / "callbacks"),
            progress_bar=False,
        )
        if parts.subspace:
            callbacks.append(SafetySubspaceInit(prompts, report_path=str(work / "subspace_init.json"), **common))
        if parts.null_space:
            null_cb = NullSpaceProjection(
                prompts, threshold=ctx.threshold, report_path=str(work / "null_space.json"), **common
            )
    if parts.asft:
        callbacks.append(
            AsFTRegularizer(str(ctx.patch_dir), regularization_weight=1.0 if spec.weight is None else spec.weight)
        )
    if parts.spf:
        samples = [{"prompt": prompt, "response": REFUSAL} for prompt in ctx.splits.spf_prompts]
        callbacks.append(
            SafetyGradientProjection(
                samples, tokenizer=ctx.tokenizer, max_length=profile.max_length, refresh_every=spec.refresh_every or 1
            )
        )
    if null_cb is not None:
        callbacks.append(null_cb)
    return callbacks, null_cb


def train_run(spec: RunSpec, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune the aligned model; returns the trained model (merged) and what the run did."""
    profile = ctx.profile
    work = ctx.out / "tmp" / spec.run_id
    shutil.rmtree(work, ignore_errors=True)
    examples, num_poison = training_examples(ctx.splits, ctx.poison, profile, spec.p, spec.seed)
    rows = [tokenize_example(ctx.tokenizer, e, "chat_template", profile.max_length) for e in examples]
    pl.seed_everything(spec.seed, verbose=False)
    loader = DataLoader(
        rows, batch_size=profile.batch_size, shuffle=True, generator=torch.Generator().manual_seed(spec.seed),
        collate_fn=partial(collate, pad_id=ctx.tokenizer.pad_token_id),
    )
    base = load_causal_lm(str(ctx.aligned_dir))
    callbacks: list[pl.Callback] = []
    null_cb = None
    if METHODS[spec.method].lora:
        module: pl.LightningModule = GuardSpaceLM.from_pretrained_model(
            base, ctx.tokenizer, lora_rank=profile.lora_rank, lora_alpha=profile.lora_alpha, learning_rate=spec.lr,
            adapter_dir=str(work / "adapter"),
        )
        callbacks, null_cb = _callbacks(spec, ctx, work)
    else:
        module = FullFineTuneLM(base, spec.lr)
    start = time.perf_counter()
    trainer(work, precision_for(profile), max_epochs=profile.epochs, callbacks=callbacks).fit(module, loader)
    info = {
        "n": profile.n,
        "num_poison": num_poison,
        "steps": len(loader) * profile.epochs,
        "train_seconds": time.perf_counter() - start,
        "final_train_loss": float(module.trainer.callback_metrics.get("train_loss", float("nan"))),
        "null_space": null_space_summary(null_cb.report) if null_cb else None,
        "threshold": ctx.threshold if null_cb else None,
    }
    state = ctx.state_dir(spec.run_id)
    shutil.rmtree(state, ignore_errors=True)
    model, parts = module.model, METHODS[spec.method]
    if parts.lora and not parts.subspace:
        # The frozen weights are the aligned start's: the adapter is the whole run (and post-hoc methods read it).
        model.save_pretrained(state / "adapter")
        model = model.merge_and_unload()
    else:  # full fine-tuning, or the subspace init's residual base weights: keep the merged model
        model = model.merge_and_unload() if parts.lora else model
        model.save_pretrained(state / "model")
    shutil.rmtree(work, ignore_errors=True)
    return model, info


def load_trained(spec: RunSpec, ctx: Context, merged: bool = True) -> nn.Module:
    """The model a training run left under ``states/``; plain LoRA as a PeftModel unless ``merged``."""
    state = ctx.state_dir(spec.run_id)
    if (state / "model").exists():
        return load_causal_lm(str(state / "model"))
    if not (state / "adapter").exists():
        raise FileNotFoundError(f"No saved model for {spec.run_id} in {state}; run its training first.")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(str(ctx.aligned_dir)), str(state / "adapter"))
    return model.merge_and_unload() if merged else model


def posthoc_model(spec: PosthocSpec, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """The LoRA run's model with the post-hoc method applied, and its report."""
    from guardspace_pl.lora import find_lora_targets
    from guardspace_pl.safety_reference import SafetyReference

    start = time.perf_counter()
    model = load_trained(spec.base, ctx, merged=False)
    info: dict[str, Any] = {}
    if spec.posthoc == "patch":
        from guardspace_pl.patches import apply_patches

        model = apply_patches(model, [str(ctx.patch_dir)], mode="merged", allow_repeat=True)
    else:
        targets = find_lora_targets(model)
        reference = SafetyReference.from_patch_adapter(ctx.patch_dir)
        method, settings = spec.posthoc.split("-")[0], POSTHOC_SETTINGS[spec.posthoc]
        if method == "safelora":
            from guardspace_pl.safelora import apply_safelora

            report = apply_safelora(
                targets,
                reference,
                settings["mode"],
                settings.get("num_projected_modules", 10),
                settings.get("threshold", 0.5),
                "faithful",
            )
            info = {"projected": len(report.projected_names), "modules": len(targets), **settings}
        elif method == "lssf":
            from guardspace_pl.lssf import apply_lssf, collect_anchor_covariances

            anchors = ctx.splits.lssf_anchors
            covariances, _ = collect_anchor_covariances(
                model, targets, ctx.tokenizer, anchors, ctx.profile.lssf_tokens, ctx.profile.gen_batch_size
            )
            report = apply_lssf(
                targets, reference, covariances, alpha=settings["alpha"], num_anchor_prompts=len(anchors)
            )
            fused = [m for m in report.modules if m.skipped is None]
            info = {"fused": len(fused), "modules": len(targets), "anchors": len(anchors), "eta": 0.9, **settings}
        else:
            raise ValueError(f"Unknown post-hoc method {spec.posthoc!r}.")
        model = model.merge_and_unload()
    info["posthoc_seconds"] = time.perf_counter() - start
    return model, info


def describe(spec: Spec) -> dict[str, Any]:
    """The fields a result row carries about its run."""
    if isinstance(spec, PosthocSpec):
        return {
            "run_id": spec.run_id,
            **asdict(spec.base),
            "posthoc": spec.posthoc,
            "base_run": spec.base.run_id,
            "variant": spec.variant,
        }
    return {"run_id": spec.run_id, **asdict(spec), "posthoc": "-", "variant": spec.variant}
