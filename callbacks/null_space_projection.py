"""``NullSpaceProjection``: keep every adapter update out of the span of harmful-prompt activations."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.calibration import SampleNormalization, collect_covariances
from guardspace_pl.distributed import broadcast_, broadcast_object, local_tensor, rank, world_size
from guardspace_pl.lora import LoraTarget
from guardspace_pl.null_space import NullSpaceProjector, ThresholdMode, merge_residual_correction, null_space_projector
from guardspace_pl.prompts import PromptFormat

from .base import CalibratedLoraCallback, find_causal_lm


class NullSpaceProjection(CalibratedLoraCallback):
    r"""Project LoRA ``A`` and its gradients onto the null space of harmful-prompt activations (section 2).

    For each LoRA layer, ``P`` projects onto the directions its inputs on the calibration prompts do not
    span. At fit start ``lora_A <- lora_A P`` (the frozen weight absorbs the difference, so the function is
    unchanged); before each optimizer step ``grad(lora_A) <- grad(lora_A) P`` (accumulated, unscaled, before
    clipping); after each step ``lora_A <- lora_A P`` again, because Adam's element-wise scaling moves updates
    out of range(P). Then ``(W' + s B A) k = W k`` for every calibration activation ``k``: the model's outputs
    on those prompts never change. ``P`` is never materialised densely nor put in the forward pass.

    The guarantee needs the LoRA factors to be the only trainable parameters (no ``modules_to_save``, biases or
    embeddings) and plain LoRA (no DoRA): anything else is rejected at fit start. Gradient edits of other
    callbacks in ``on_before_optimizer_step`` cannot break it either: ``A`` is re-projected after every step.

    Args:
        calibration_prompts: prompts whose outputs must not move (paper: toxic prompts; default: the
            DataModule's ``calibration_prompts("null_space")``).
        tokenizer: a tokenizer, or a name/path to load one (default: the DataModule's or LightningModule's).
        prompt_format: ``"raw"`` (paper) or ``"chat_template"``; default: the DataModule's training format.
        threshold: eigenvalues ``<= max(min_eigenvalue, threshold * max|lambda|)`` span the null space (paper:
            1e-6); with ``threshold_mode="energy"``, the null space holds at most this fraction (in [0, 1)) of
            the energy.
        threshold_mode: ``"relative"`` (paper) or ``"energy"``.
        min_eigenvalue: the absolute floor of the relative threshold (paper: 1e-8).
        sample_normalization: per-sample scaling before the covariance (``"max"`` as the official code).
        max_length: calibration prompts longer than this are cut in the middle (a warning counts them).
        batch_size: calibration prompts per forward pass (padding is masked out of the covariance).
        covariance_dtype: ``float64`` makes the numerically-null directions reproducible across shard layouts.
        adapter_name: the PEFT adapter to protect (default: the single active one).
        empty_null_space: ``"warn"`` or ``"error"`` when a layer's null space is empty (its ``A`` cannot move).
        cache_dir: cache the projectors here, keyed by model weights, prompts and settings.
        report_path: JSON per-layer null-space dimensions (default ``<log_dir>/guardspace/null_space.json``).
        progress_bar: show progress over calibration batches.
    """

    calibration_kind = "null_space"
    report_filename = "null_space.json"
    cache_prefix = "null_space"
    state_settings = ("threshold", "threshold_mode", "min_eigenvalue", "sample_normalization", "covariance_dtype")

    def __init__(
        self,
        calibration_prompts: Optional[Sequence[str]] = None,
        tokenizer: Union[None, str, PreTrainedTokenizerBase] = None,
        prompt_format: Optional[PromptFormat] = None,
        threshold: float = 1e-6,
        threshold_mode: ThresholdMode = "relative",
        min_eigenvalue: float = 1e-8,
        sample_normalization: SampleNormalization = "max",
        max_length: int = 2048,
        batch_size: int = 8,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        adapter_name: Optional[str] = None,
        empty_null_space: Literal["warn", "error"] = "warn",
        cache_dir: Optional[str] = None,
        report_path: Optional[str] = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(
            calibration_prompts, tokenizer, prompt_format, sample_normalization, max_length, batch_size,
            covariance_dtype, adapter_name, cache_dir, report_path, progress_bar,
        )
        if threshold_mode not in ("relative", "energy"):
            raise ValueError(f"threshold_mode must be 'relative' or 'energy', got {threshold_mode!r}.")
        if threshold < 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}.")
        if threshold_mode == "energy" and not threshold < 1:
            raise ValueError(
                f"With threshold_mode='energy' the threshold is the fraction of the activation energy the null space "
                f"may hold, in [0, 1); got {threshold}. Did you mean threshold_mode='relative'?"
            )
        if min_eigenvalue < 0:
            raise ValueError(f"min_eigenvalue must be non-negative, got {min_eigenvalue}.")
        if empty_null_space not in ("warn", "error"):
            raise ValueError(f"empty_null_space must be 'warn' or 'error', got {empty_null_space!r}.")
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.min_eigenvalue = min_eigenvalue
        self.empty_null_space = empty_null_space
        #: projector per distinct layer input, and which input each LoRA layer reads
        self.projectors: dict[str, NullSpaceProjector] = {}
        self.input_of: dict[str, str] = {}
        self._targets: list[LoraTarget] = []
        self._hooks: list = []

    @override
    def reset(self) -> None:
        super().reset()
        self.projectors = {}
        self.input_of = {}
        self._targets = []
        self._remove_hooks()

    # ------------------------------------------------------------------ set-up
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.initialize(trainer, pl_module)
        missing = [t.name for t in self._targets if t.name not in self.input_of]
        if missing:
            raise RuntimeError(
                f"No null-space projector for LoRA layers {missing[:5]}: the model's LoRA layers differ from those the "
                "projectors were built for (another model, or other target_modules, than the checkpoint's)."
            )
        self._move_projectors(local_tensor(self._targets[0].lora_A).device)

    @override
    def initialize(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build (or take restored) projectors, project the initial adapters, hook the optimizer: once per fit."""
        if self.initialized:
            return
        from .safety_subspace_init import SafetySubspaceInit

        # The projection must act on the final initial adapters, whatever the callbacks' order in the list.
        for callback in trainer.callbacks:
            if isinstance(callback, SafetySubspaceInit):
                callback.initialize(trainer, pl_module)
        super().initialize(trainer, pl_module)
        self._targets = self.lora_targets(pl_module)
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _check_targets(self, pl_module: torch.nn.Module, targets: list[LoraTarget]) -> None:
        self.require_only_lora_trainable(pl_module, targets)

    def _compute(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget],
        token_ids: list[list[int]], tokenizer: PreTrainedTokenizerBase,
    ) -> dict[str, Any]:
        device = local_tensor(targets[0].base.weight).device
        by_layer, groups = collect_covariances(
            find_causal_lm(pl_module), targets, token_ids, normalization=self.sample_normalization,
            batch_size=self.batch_size, pad_id=tokenizer.pad_token_id or 0, device=device,
            progress=self.progress_bar, description="NullSpaceProjection: calibration",
            dtype=getattr(torch, self.covariance_dtype),
        )
        projectors: dict[str, NullSpaceProjector] = {}
        input_of: dict[str, str] = {}
        # Each rank solves its share of the distinct inputs; the bases are then broadcast.
        for i, group in enumerate(groups):
            owner = i % world_size()
            mine = (
                null_space_projector(group.covariance, self.threshold, self.threshold_mode, self.min_eigenvalue)
                if owner == rank()
                else None
            )
            meta = broadcast_object((mine.basis.shape, mine.complement, mine.null_dim) if mine else None, owner)
            basis = mine.basis if mine else torch.empty(meta[0], dtype=torch.float32, device=device)
            basis = broadcast_(basis.to(device).contiguous(), owner)
            projectors[group.name] = NullSpaceProjector(basis.cpu(), meta[1], meta[2])
            for member in group.members:
                input_of[member] = group.name
        report = [
            {"layer": t.name, "input": input_of[t.name], "in_features": t.shape[1],
             "null_dim": projectors[input_of[t.name]].null_dim, "calibration_samples": by_layer[t.name].num_samples}
            for t in targets
        ]
        return {"projectors": _projector_states(projectors), "input_of": input_of, "report": report}

    def _apply(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget], payload: dict[str, Any]
    ) -> None:
        self.projectors = {name: NullSpaceProjector.from_state_dict(s) for name, s in payload["projectors"].items()}
        self.input_of = dict(payload["input_of"])
        self.report = list(payload["report"])
        self._targets = targets
        self._summarise(trainer)
        self._project_initial_adapters()

    def _summarise(self, trainer: "pl.Trainer") -> None:
        frozen = [r["layer"] for r in self.report if r["null_dim"] == 0]
        dims = [r["null_dim"] for r in self.report]
        source = "cache" if self.loaded_from_cache else "calibration"
        rank_zero_info(
            f"NullSpaceProjection: {len(self.projectors)} distinct inputs (from {source}), null-space dimension "
            f"min {min(dims)} / median {sorted(dims)[len(dims) // 2]} / max {max(dims)} over {len(dims)} layers "
            f"(threshold {self.threshold:g}, {self.threshold_mode})."
        )
        if frozen:
            message = (
                f"{len(frozen)} of {len(self.report)} LoRA layers have an empty null space, so their adapters cannot "
                f"move (e.g. {frozen[:3]}). Allow more headroom: a larger threshold (e.g. 1e-4) or "
                "threshold_mode='energy'."
            )
            if self.empty_null_space == "error":
                raise ValueError(message)
            rank_zero_warn(message)
        if trainer.logger is not None and rank() == 0:
            trainer.logger.log_metrics(
                {
                    "guardspace/null_dim_min": min(dims),
                    "guardspace/null_dim_max": max(dims),
                    "guardspace/frozen_layers": len(frozen),
                },
                step=0,
            )

    def _move_projectors(self, device: torch.device) -> None:
        for name, projector in self.projectors.items():
            if projector.basis.device != device:
                self.projectors[name] = projector.to(device)

    @torch.no_grad()
    def _project_initial_adapters(self) -> None:
        """``A <- A P``; ``W' += s B (A - A P)`` keeps the function exactly ``W + s B A`` (B = 0 for plain LoRA)."""
        self._move_projectors(local_tensor(self._targets[0].lora_A).device)
        for target in self._targets:
            weight, lora_A, lora_B = target.full()
            projected = self.projector(target).project(lora_A.double()).to(lora_A.dtype)
            if torch.count_nonzero(lora_B):
                correction = merge_residual_correction(lora_A, projected, lora_B, target.scaling)
                target.write(weight=(weight.double() + correction).to(weight.dtype))
            target.write(lora_A=projected)

    # ------------------------------------------------------------------ training
    def projector(self, target: LoraTarget) -> NullSpaceProjector:
        """The projector of the input that ``target`` reads."""
        return self.projectors[self.input_of[target.name]]

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        # Gradients are accumulated and unscaled here, and not yet clipped: clipping sees the projected norm.
        with torch.no_grad():
            for target in self._targets:
                grad = target.lora_A.grad
                if grad is not None:
                    local = local_tensor(grad)  # FSDP2 shards rows of A: projecting rows is a local op
                    local.copy_(self.projector(target).project(local))

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for target in self._targets:
                local = local_tensor(target.lora_A)
                local.copy_(self.projector(target).project(local))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "projectors": _projector_states(self.projectors),
            "input_of": dict(self.input_of),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.projectors = {
            name: NullSpaceProjector.from_state_dict(s) for name, s in state_dict.get("projectors", {}).items()
        }
        self.input_of = dict(state_dict.get("input_of", {}))
        if not self.projectors:
            raise ValueError(
                "The checkpoint's NullSpaceProjection state holds no projectors: it was saved before they were built. "
                "Resume from a checkpoint written during training, or start a new run."
            )


def _projector_states(projectors: dict[str, NullSpaceProjector]) -> dict[str, dict[str, Any]]:
    return {
        name: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in p.state_dict().items()}
        for name, p in projectors.items()
    }
