"""``SafetySubspaceInit``: initialise LoRA adapters from the safety-irrelevant part of each weight."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from guardspace_pl.calibration import SampleNormalization, collect_covariances
from guardspace_pl.decomposition import (
    ComponentSelection,
    DampedCovariance,
    damp_covariance,
    residual_weight,
    subspace_init,
)
from guardspace_pl.distributed import broadcast_, is_distributed, local_tensor, rank, world_size
from guardspace_pl.lora import LoraTarget
from guardspace_pl.prompts import PromptFormat

from .base import CalibratedLoraCallback, find_causal_lm


class SafetySubspaceInit(CalibratedLoraCallback):
    r"""Covariance-preconditioned SVD of every LoRA-adapted weight on harmful prompts (GuardSpace, section 1).

    At fit start, for each LoRA layer with effective weight ``W`` (the frozen weight plus the adapter's current
    ``s B A``, zero for a fresh LoRA): ``C`` is the covariance of its inputs on the calibration prompts,
    ``W C~ = U S V^T`` with ``C~`` the damped ``C``, and the adapter is built from the ``rank`` smallest
    components (``components="kpa"``: the directions the harmful prompts use least) or the largest (``"ipa"``).
    The frozen weight becomes ``W - s B A`` so the model's function is unchanged.

    Works on any LightningModule whose model carries PEFT LoRA layers. A resumed fit takes the adapters and
    residual weights from the checkpoint; resuming a checkpoint of a run without this callback is an error.

    Args:
        calibration_prompts: harmful prompts (paper: the 520 AdvBench behaviours); default: the DataModule's
            ``calibration_prompts("subspace")``.
        tokenizer: a tokenizer, or a name/path to load one (default: the DataModule's or LightningModule's).
        prompt_format: ``"raw"`` (paper) or ``"chat_template"``; default: the DataModule's training format.
        components: ``"kpa"`` (smallest r, GuardSpace) or ``"ipa"`` (largest r, as PiSSA/CorDA-IPM).
        sample_normalization: per-sample scaling before the covariance (``"max"`` as the official code).
        damp: initial damping factor, doubled until ``C~`` inverts accurately.
        max_length: calibration prompts longer than this are cut in the middle (a warning counts them).
        batch_size: calibration prompts per forward pass (padding is masked out of the covariance).
        covariance_dtype: accumulate covariances in ``float32`` (paper) or ``float64``.
        layers_per_pass: decompose this many layers per pass to bound memory (default: all at once).
        adapter_name: the PEFT adapter to initialise (default: the single active one).
        cache_dir: cache the factors here, keyed by model weights, prompts and settings, so a restarted run does
            not redo the decomposition.
        report_path: JSON per-layer report (default ``<log_dir>/guardspace/subspace_init.json``).
        progress_bar: show progress over calibration batches and layers.
    """

    calibration_kind = "subspace"
    report_filename = "subspace_init.json"
    cache_prefix = "subspace"
    state_settings = ("components", "sample_normalization", "damp", "covariance_dtype")

    def __init__(
        self,
        calibration_prompts: Optional[Sequence[str]] = None,
        tokenizer: Union[None, str, PreTrainedTokenizerBase] = None,
        prompt_format: Optional[PromptFormat] = None,
        components: ComponentSelection = "kpa",
        sample_normalization: SampleNormalization = "max",
        damp: float = 0.01,
        max_length: int = 2048,
        batch_size: int = 8,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        layers_per_pass: Optional[int] = None,
        adapter_name: Optional[str] = None,
        cache_dir: Optional[str] = None,
        report_path: Optional[str] = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(
            calibration_prompts, tokenizer, prompt_format, sample_normalization, max_length, batch_size,
            covariance_dtype, adapter_name, cache_dir, report_path, progress_bar,
        )
        if components not in ("kpa", "ipa"):
            raise ValueError(f"components must be 'kpa' or 'ipa', got {components!r}.")
        if layers_per_pass is not None and layers_per_pass < 1:
            raise ValueError(f"layers_per_pass must be at least 1, got {layers_per_pass}.")
        if not damp > 0:
            raise ValueError(f"damp must be positive (it is doubled until the covariance inverts), got {damp}.")
        self.components = components
        self.damp = damp
        self.layers_per_pass = layers_per_pass

    def _check_targets(self, pl_module: torch.nn.Module, targets: list[LoraTarget]) -> None:
        for target in targets:
            m, n = target.shape
            if target.rank >= min(m, n):
                raise ValueError(
                    f"LoRA rank {target.rank} of {target.name!r} must be smaller than min(out, in) = {min(m, n)} "
                    "of its weight: lower the rank or exclude this module."
                )

    def _compute(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget],
        token_ids: list[list[int]], tokenizer: PreTrainedTokenizerBase,
    ) -> dict[str, Any]:
        model = find_causal_lm(pl_module)
        device = local_tensor(targets[0].base.weight).device
        step = self.layers_per_pass or len(targets)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        report: dict[str, dict[str, Any]] = {}
        # Each rank decomposes every world_size-th layer of each pass; rank 0's bar shows its own share.
        own = sum(len(range(rank(), min(step, len(targets) - s), world_size())) for s in range(0, len(targets), step))
        layer_bar = tqdm(total=own, desc="SafetySubspaceInit: SVD", disable=not self.progress_bar or rank() != 0)
        for start in range(0, len(targets), step):
            chunk = targets[start : start + step]
            by_layer, _ = collect_covariances(
                model, chunk, token_ids, normalization=self.sample_normalization, batch_size=self.batch_size,
                pad_id=tokenizer.pad_token_id or 0, device=device, progress=self.progress_bar,
                description="SafetySubspaceInit: calibration", dtype=getattr(torch, self.covariance_dtype),
            )
            # Gather every layer of the pass first (a collective under FSDP2: every rank takes part in every
            # all-gather), keeping only this rank's share, in the weights' own dtype.
            owned = {}
            for i, target in enumerate(chunk):
                full = target.full()
                if i % world_size() == rank():
                    owned[i] = full
            damped: dict[int, DampedCovariance] = {}  # one inverse per shared input, not one per layer
            for i, full in owned.items():
                target = chunk[i]
                weight = effective_weight(target, full)
                group = by_layer[target.name]
                if id(group) not in damped:
                    damped[id(group)] = damp_covariance(group.covariance, damp=self.damp)
                result = subspace_init(
                    weight, group.covariance, target.rank, target.scaling, self.components, self.damp,
                    damped=damped[id(group)],
                )
                factors[target.name] = {"lora_A": result.lora_A.float(), "lora_B": result.lora_B.float()}
                kept_sv, frozen_sv = result.kept_singular_values, result.frozen_singular_values
                report[target.name] = {
                    "layer": target.name, "shape": list(target.shape), "rank": target.rank,
                    "components": self.components,
                    "kept_singular_values": [kept_sv.min().item(), kept_sv.max().item()],
                    "frozen_singular_values": (
                        [frozen_sv.min().item(), frozen_sv.max().item()] if frozen_sv.numel() else []
                    ),
                    "damp": result.damp, "covariance_shared_with": group.members,
                    "calibration_samples": group.num_samples,
                }
                layer_bar.update(1)
            del owned, damped
            for i, target in enumerate(chunk):
                owner = i % world_size()
                m, n = target.shape
                a = factors[target.name]["lora_A"] if owner == rank() else torch.empty(target.rank, n, device=device)
                b = factors[target.name]["lora_B"] if owner == rank() else torch.empty(m, target.rank, device=device)
                factors[target.name] = {
                    "lora_A": broadcast_(a.to(device).contiguous(), owner).cpu(),
                    "lora_B": broadcast_(b.to(device).contiguous(), owner).cpu(),
                }
        layer_bar.close()
        if is_distributed():
            import torch.distributed as dist

            gathered: list[Optional[dict]] = [None] * world_size()
            dist.all_gather_object(gathered, report)
            report = {k: v for part in gathered for k, v in (part or {}).items()}
        return {"factors": factors, "report": [report[t.name] for t in targets]}

    @torch.no_grad()
    def _apply(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget], payload: dict[str, Any]
    ) -> None:
        """Adapters from the factors and ``W' = W_eff - s B A`` (float64, then the weight's dtype), in place."""
        factors = payload["factors"]
        self.report = list(payload["report"])
        for target in targets:
            if target.name not in factors:
                raise KeyError(f"The cached decomposition has no factors for {target.name!r}; delete the cache file.")
            a, b = factors[target.name]["lora_A"], factors[target.name]["lora_B"]
            weight = effective_weight(target)
            residual = residual_weight(weight, a.to(weight.device), b.to(weight.device), target.scaling)
            target.write(
                weight=residual.to(target.base.weight.dtype),
                lora_A=a.to(device=weight.device, dtype=target.lora_A.dtype),
                lora_B=b.to(device=weight.device, dtype=target.lora_B.dtype),
            )
        damps = [r["damp"] for r in self.report]
        source = "cache" if self.loaded_from_cache else "calibration"
        rank_zero_info(
            f"SafetySubspaceInit: {len(self.report)} layers initialised from {source} "
            f"({self.components}, damping {min(damps):.3g}-{max(damps):.3g})."
        )

    def _on_resume(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget]) -> None:
        rank_zero_info("SafetySubspaceInit: resuming; the adapters and residual weights come from the checkpoint.")


def effective_weight(
    target: LoraTarget, full: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
) -> torch.Tensor:
    """``W + s B A`` of the layer as it is now (float64, unsharded): what the model computes, whatever the
    adapter's init.

    Args:
        target: the LoRA layer.
        full: its already gathered ``(W, lora_A, lora_B)`` (default: gather them, a collective under FSDP2).
    """
    weight, lora_A, lora_B = full if full is not None else target.full()
    effective = weight.double()
    if torch.count_nonzero(lora_B):
        effective = effective + target.scaling * (lora_B.double() @ lora_A.double())
    return effective
