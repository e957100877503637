"""``NullSpaceProjection``: keep every adapter update out of the span of harmful-prompt activations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.calibration import SampleNormalization, collect_covariances, fingerprint
from guardspace_pl.distributed import broadcast_, broadcast_object, full_tensor, local_tensor, rank, world_size, write_full_
from guardspace_pl.lora import LoraTarget, find_lora_targets
from guardspace_pl.null_space import NullSpaceProjector, ThresholdMode, null_space_projector
from guardspace_pl.prompts import PromptFormat

from ._calibration import atomic_torch_save, check_strategy, calibration_token_ids, default_output_path, find_causal_lm, weight_statistics, write_json

log = logging.getLogger(__name__)


class NullSpaceProjection(Callback):
    r"""Project LoRA ``A`` and its gradients onto the null space of harmful-prompt activations (section 2).

    For each LoRA layer, ``P`` projects onto the directions its inputs on the calibration prompts do not
    span. At fit start ``lora_A <- lora_A P`` (the frozen weight absorbs the difference, so the function is
    unchanged); before each optimizer step ``grad(lora_A) <- grad(lora_A) P`` (accumulated, unscaled, before
    clipping); after each step ``lora_A <- lora_A P`` again, because Adam's element-wise scaling moves updates
    out of range(P). Then ``(W' + s B A) k = W k`` for every calibration activation ``k``: the model's outputs
    on those prompts never change. ``P`` is never materialised densely nor put in the forward pass.

    Args:
        calibration_prompts: prompts whose outputs must not move (paper: toxic prompts; default: the
            DataModule's ``calibration_prompts("null_space")``).
        tokenizer, prompt_format, sample_normalization, max_length, batch_size, adapter_name, cache_dir,
        report_path, progress_bar: as in :class:`SafetySubspaceInit`.
        threshold: eigenvalues ``<= max(1e-8, threshold * max|lambda|)`` span the null space (paper: 1e-6);
            with ``threshold_mode="energy"``, the null space holds at most this fraction of the energy.
        min_eigenvalue: the absolute floor of the relative threshold (paper: 1e-8).
        covariance_dtype: ``float64`` makes the numerically-null directions reproducible across shard layouts.
        empty_null_space: ``"warn"`` or ``"error"`` when a layer's null space is empty (its ``A`` cannot move).
    """

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
        super().__init__()
        if threshold_mode not in ("relative", "energy"):
            raise ValueError(f"threshold_mode must be 'relative' or 'energy', got {threshold_mode!r}.")
        if threshold < 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}.")
        if empty_null_space not in ("warn", "error"):
            raise ValueError(f"empty_null_space must be 'warn' or 'error', got {empty_null_space!r}.")
        self.calibration_prompts = calibration_prompts
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.min_eigenvalue = min_eigenvalue
        self.sample_normalization = sample_normalization
        self.max_length = max_length
        if covariance_dtype not in ("float32", "float64"):
            raise ValueError(f"covariance_dtype must be 'float32' or 'float64', got {covariance_dtype!r}.")
        self.covariance_dtype = covariance_dtype
        self.batch_size = batch_size
        self.adapter_name = adapter_name
        self.empty_null_space = empty_null_space
        self.cache_dir = cache_dir
        self.report_path = report_path
        self.progress_bar = progress_bar
        #: projector per distinct layer input, and which input each LoRA layer reads
        self.projectors: dict[str, NullSpaceProjector] = {}
        self.input_of: dict[str, str] = {}
        self.report: list[dict[str, Any]] = []
        self.loaded_from_cache = False
        self._targets: list[LoraTarget] = []
        self._hooks: list = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, threshold_mode=self.threshold_mode)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_strategy(trainer, "NullSpaceProjection")

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Sharded strategies restore the checkpoint (weights, projectors) after this hook: prepare in
        # on_train_start there, once trainer.ckpt_path and the restored state are known.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._prepare(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._prepare(trainer, pl_module)
        if not self.projectors:
            raise RuntimeError(
                "NullSpaceProjection has no projectors: the checkpoint being resumed was not trained with this "
                "callback. Resume from a GuardSpace checkpoint or start a new run."
            )
        missing = [t.name for t in self._targets if t.name not in self.input_of]
        if missing:
            raise RuntimeError(f"No null-space projector for LoRA layers {missing[:5]}: the model changed since they were built.")
        self._move_projectors(local_tensor(self._targets[0].lora_A).device)

    def _prepare(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Build (or take restored) projectors, project the initial adapters, hook the optimizer: once."""
        if self._hooks:
            return
        from .safety_subspace_init import SafetySubspaceInit

        # The projection must act on the final initial adapters, whatever the callbacks' order in the list.
        for callback in trainer.callbacks:
            if isinstance(callback, SafetySubspaceInit):
                callback.initialize(trainer, pl_module)
        self._targets = find_lora_targets(pl_module, self.adapter_name)
        resuming = trainer.ckpt_path is not None
        if not self.projectors and not resuming:
            self._build_projectors(trainer, pl_module)
        if self.projectors and not resuming:
            self._project_initial_adapters()
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _build_projectors(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        targets = self._targets
        token_ids, tokenizer, prompt_format = calibration_token_ids(
            self.calibration_prompts, self.tokenizer, self.prompt_format, self.max_length, "null_space", trainer, pl_module
        )
        key = fingerprint(
            "nullspace-v1", self.covariance_dtype, self.threshold, self.threshold_mode, self.min_eigenvalue, self.sample_normalization, prompt_format,
            [(t.name, t.shape) for t in targets], weight_statistics(targets), token_ids,
        )
        cache_file = Path(self.cache_dir) / f"null_space_{key}.pt" if self.cache_dir else None
        if cache_file is not None and cache_file.exists():
            self.load_state_dict(torch.load(cache_file, map_location="cpu", weights_only=True))
            self.loaded_from_cache = True
            rank_zero_info(f"NullSpaceProjection: loaded projectors from {cache_file}.")
        else:
            device = local_tensor(targets[0].base.weight).device
            by_layer, groups = collect_covariances(
                find_causal_lm(pl_module), targets, token_ids, normalization=self.sample_normalization,
                batch_size=self.batch_size, pad_id=tokenizer.pad_token_id or 0, device=device,
                progress=self.progress_bar, description="NullSpaceProjection: calibration",
                dtype=getattr(torch, self.covariance_dtype),
            )
            # Each rank solves its share of the distinct inputs; the bases are then broadcast.
            for i, group in enumerate(groups):
                owner = i % world_size()
                projector = null_space_projector(group.covariance, self.threshold, self.threshold_mode, self.min_eigenvalue) if owner == rank() else None
                meta = broadcast_object((projector.basis.shape, projector.complement, projector.null_dim) if projector else None, owner)
                basis = projector.basis if projector else torch.empty(meta[0], dtype=torch.float32, device=device)
                basis = broadcast_(basis.to(device).contiguous(), owner)
                self.projectors[group.name] = NullSpaceProjector(basis, meta[1], meta[2])
                for member in group.members:
                    self.input_of[member] = group.name
            self.report = [
                {"layer": t.name, "input": self.input_of[t.name], "in_features": t.shape[1],
                 "null_dim": self.projectors[self.input_of[t.name]].null_dim, "calibration_samples": by_layer[t.name].num_samples}
                for t in targets
            ]
            if cache_file is not None:
                atomic_torch_save(self.state_dict(), cache_file)
        write_json(default_output_path(trainer, "null_space.json", self.report_path), self.report)
        self._summarise(trainer)

    def _summarise(self, trainer: "pl.Trainer") -> None:
        frozen = [r["layer"] for r in self.report if r["null_dim"] == 0]
        dims = [r["null_dim"] for r in self.report]
        rank_zero_info(
            f"NullSpaceProjection: {len(self.projectors)} distinct inputs, null-space dimension "
            f"min {min(dims)} / median {sorted(dims)[len(dims) // 2]} / max {max(dims)} over {len(dims)} layers "
            f"(threshold {self.threshold:g}, {self.threshold_mode})."
        )
        if frozen:
            message = (
                f"{len(frozen)} of {len(self.report)} LoRA layers have an empty null space, so their adapters cannot "
                f"move (e.g. {frozen[:3]}). Use more calibration tokens' worth of headroom: a larger threshold "
                "(e.g. 1e-4) or threshold_mode='energy'."
            )
            if self.empty_null_space == "error":
                raise ValueError(message)
            rank_zero_warn(message)
        if trainer.logger is not None and rank() == 0:
            trainer.logger.log_metrics(
                {"guardspace/null_dim_min": min(dims), "guardspace/null_dim_max": max(dims), "guardspace/frozen_layers": len(frozen)}, step=0
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
                correction = target.scaling * (lora_B.double() @ (lora_A.double() - projected.double()))
                write_full_(target.base.weight, (weight.double() + correction).to(weight.dtype))
            write_full_(target.lora_A, projected)

    # ------------------------------------------------------------------ training
    def projector(self, target: LoraTarget) -> NullSpaceProjector:
        return self.projectors[self.input_of[target.name]]

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer) -> None:
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

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "projectors": {name: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in p.state_dict().items()} for name, p in self.projectors.items()},
            "input_of": dict(self.input_of),
            "report": self.report,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.projectors = {name: NullSpaceProjector.from_state_dict(s) for name, s in state_dict.get("projectors", {}).items()}
        self.input_of = dict(state_dict.get("input_of", {}))
        self.report = list(state_dict.get("report", []))
