"""``SafetySubspaceInit``: initialise LoRA adapters from the safety-irrelevant part of each weight."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.calibration import SampleNormalization, collect_covariances, fingerprint
from guardspace_pl.decomposition import ComponentSelection, DampedCovariance, damp_covariance, subspace_init
from guardspace_pl.distributed import broadcast_, full_tensor, is_distributed, local_tensor, rank, world_size, write_full_
from guardspace_pl.lora import LoraTarget, find_lora_targets
from guardspace_pl.prompts import PromptFormat

from ._calibration import atomic_torch_save, check_strategy, calibration_token_ids, default_output_path, find_causal_lm, weight_statistics, write_json

log = logging.getLogger(__name__)


class SafetySubspaceInit(Callback):
    r"""Covariance-preconditioned SVD of every LoRA-adapted weight on harmful prompts (GuardSpace, section 1).

    At fit start, for each LoRA layer with weight ``W``: ``C`` is the covariance of its inputs on the
    calibration prompts, ``W C~ = U S V^T`` with ``C~`` the damped ``C``, and the adapter is built from the
    ``rank`` smallest components (``components="kpa"``: the directions the harmful prompts use least) or
    the largest (``"ipa"``). The frozen weight becomes ``W - s B A`` so the model's function is unchanged.

    Works on any LightningModule whose model carries PEFT LoRA layers. Prompts come from
    ``calibration_prompts`` or the DataModule's ``calibration_prompts("subspace")``; the tokenizer from
    ``tokenizer`` or the DataModule's/LightningModule's ``tokenizer`` attribute.

    Args:
        calibration_prompts: harmful prompts (paper: the 520 AdvBench behaviours).
        tokenizer: a tokenizer or a name/path to load one.
        prompt_format: ``"raw"`` (paper) or ``"chat_template"``; default: the DataModule's training format.
        components: ``"kpa"`` (smallest r, GuardSpace) or ``"ipa"`` (largest r, as PiSSA/CorDA-IPM).
        sample_normalization: per-sample scaling before the covariance (``"max"`` as the official code).
        damp: initial damping factor, doubled until ``C~`` inverts accurately.
        max_length: calibration prompts are truncated to this many tokens.
        batch_size: calibration prompts per forward pass (padding is masked out of the covariance).
        covariance_dtype: accumulate covariances in ``float32`` (paper) or ``float64``.
        layers_per_pass: decompose this many layers per pass to bound memory (default: all at once).
        adapter_name: the PEFT adapter to initialise (default: the single active one).
        cache_dir: cache the factors here, keyed by model weights, prompts and settings, so a restarted run
            does not redo the decomposition.
        report_path: JSON per-layer report (default ``<log_dir>/guardspace/subspace_init.json``).
        progress_bar: show progress over calibration batches and layers.
    """

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
        super().__init__()
        if components not in ("kpa", "ipa"):
            raise ValueError(f"components must be 'kpa' or 'ipa', got {components!r}.")
        if layers_per_pass is not None and layers_per_pass < 1:
            raise ValueError(f"layers_per_pass must be at least 1, got {layers_per_pass}.")
        self.calibration_prompts = calibration_prompts
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.components = components
        self.sample_normalization = sample_normalization
        self.damp = damp
        self.max_length = max_length
        if covariance_dtype not in ("float32", "float64"):
            raise ValueError(f"covariance_dtype must be 'float32' or 'float64', got {covariance_dtype!r}.")
        self.covariance_dtype = covariance_dtype
        self.batch_size = batch_size
        self.layers_per_pass = layers_per_pass
        self.adapter_name = adapter_name
        self.cache_dir = cache_dir
        self.report_path = report_path
        self.progress_bar = progress_bar
        self.initialized = False
        self.fingerprint: Optional[str] = None
        self.report: list[dict[str, Any]] = []
        self.loaded_from_cache = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(components=self.components)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_strategy(trainer, "SafetySubspaceInit")

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Sharded strategies restore a checkpoint only after this hook (and only then is trainer.ckpt_path
        # known): initialise in on_train_start there, so a resumed run does not redo the decomposition.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self.initialize(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.initialize(trainer, pl_module)

    def initialize(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Run the decomposition once; ``NullSpaceProjection`` calls this first when both are used."""
        if self.initialized:
            return
        self.initialized = True
        targets = find_lora_targets(pl_module, self.adapter_name)
        if trainer.ckpt_path is not None:
            rank_zero_info("SafetySubspaceInit: resuming, the adapters and residual weights come from the checkpoint.")
            return
        for target in targets:
            m, n = target.shape
            if target.rank >= min(m, n):
                raise ValueError(
                    f"LoRA rank {target.rank} of {target.name!r} must be smaller than min(out, in) = {min(m, n)} "
                    "of its weight: lower the rank or exclude this module."
                )
        token_ids, tokenizer, prompt_format = calibration_token_ids(
            self.calibration_prompts, self.tokenizer, self.prompt_format, self.max_length, "subspace", trainer, pl_module
        )
        start = time.perf_counter()
        self.fingerprint = fingerprint(
            "subspace-v1", self.covariance_dtype, self.components, self.sample_normalization, self.damp, prompt_format,
            [(t.name, t.shape, t.rank, t.scaling) for t in targets], weight_statistics(targets), token_ids,
        )
        cache_file = Path(self.cache_dir) / f"subspace_{self.fingerprint}.pt" if self.cache_dir else None
        if cache_file is not None and cache_file.exists():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            factors, self.report = cached["factors"], cached["report"]
            self.loaded_from_cache = True
            rank_zero_info(f"SafetySubspaceInit: loaded the decomposition from {cache_file}.")
        else:
            factors = self._decompose(trainer, pl_module, targets, token_ids, tokenizer)
            if cache_file is not None:
                atomic_torch_save({"factors": factors, "report": self.report}, cache_file)
        self._write(targets, factors)
        write_json(default_output_path(trainer, "subspace_init.json", self.report_path), self.report)
        self._log_summary(time.perf_counter() - start, trainer)

    def _decompose(self, trainer, pl_module, targets: list[LoraTarget], token_ids, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
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
            # Gather every weight of the pass first, then each rank decomposes its own layers in parallel.
            owned: dict[int, torch.Tensor] = {}
            for i, target in enumerate(chunk):
                weight = full_tensor(target.base.weight)
                if i % world_size() == rank():
                    owned[i] = weight
            damped: dict[int, DampedCovariance] = {}  # one inverse per shared input, not one per layer
            for i, weight in owned.items():
                target = chunk[i]
                group = by_layer[target.name]
                if id(group) not in damped:
                    damped[id(group)] = damp_covariance(group.covariance, damp=self.damp)
                result = subspace_init(
                    weight, group.covariance, target.rank, target.scaling, self.components, self.damp, damped=damped[id(group)]
                )
                factors[target.name] = {"lora_A": result.lora_A.float(), "lora_B": result.lora_B.float()}
                report[target.name] = {
                    "layer": target.name, "shape": list(target.shape), "rank": target.rank, "components": self.components,
                    "kept_singular_values": [result.kept_singular_values.min().item(), result.kept_singular_values.max().item()],
                    "frozen_singular_values": [result.frozen_singular_values.min().item(), result.frozen_singular_values.max().item()]
                    if result.frozen_singular_values.numel() else [],
                    "damp": result.damp, "covariance_shared_with": group.members, "calibration_samples": group.num_samples,
                }
                layer_bar.update(1)
            del owned, damped
            for i, target in enumerate(chunk):
                owner = i % world_size()
                m, n = target.shape
                a = factors[target.name]["lora_A"] if owner == rank() else torch.empty(target.rank, n, device=device)
                b = factors[target.name]["lora_B"] if owner == rank() else torch.empty(m, target.rank, device=device)
                factors[target.name] = {"lora_A": broadcast_(a.to(device).contiguous(), owner).cpu(), "lora_B": broadcast_(b.to(device).contiguous(), owner).cpu()}
        layer_bar.close()
        if is_distributed():
            import torch.distributed as dist

            gathered: list[Optional[dict]] = [None] * world_size()
            dist.all_gather_object(gathered, report)
            report = {k: v for part in gathered for k, v in (part or {}).items()}
        self.report = [report[t.name] for t in targets]
        return factors

    @torch.no_grad()
    def _write(self, targets: list[LoraTarget], factors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Adapters from the factors and ``W' = W - s B A`` (float64, then the weight's dtype), in place."""
        for target in targets:
            if target.name not in factors:
                raise KeyError(f"The cached decomposition has no factors for {target.name!r}; delete the cache file.")
            a = factors[target.name]["lora_A"]
            b = factors[target.name]["lora_B"]
            weight = full_tensor(target.base.weight)
            residual = weight.double() - target.scaling * (b.to(weight.device).double() @ a.to(weight.device).double())
            write_full_(target.base.weight, residual.to(weight.dtype))
            write_full_(target.lora_A, a.to(device=weight.device, dtype=target.lora_A.dtype))
            write_full_(target.lora_B, b.to(device=weight.device, dtype=target.lora_B.dtype))

    def _log_summary(self, seconds: float, trainer: "pl.Trainer") -> None:
        damps = [r["damp"] for r in self.report]
        source = "cache" if self.loaded_from_cache else "calibration"
        rank_zero_info(
            f"SafetySubspaceInit: {len(self.report)} layers initialised from {source} "
            f"({self.components}, damping {min(damps):.3g}-{max(damps):.3g}) in {seconds:.1f}s."
        )
        if trainer.logger is not None and rank() == 0:
            trainer.logger.log_metrics({"guardspace/subspace_init_seconds": seconds}, step=0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initialized": self.initialized, "fingerprint": self.fingerprint, "report": self.report}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initialized = bool(state_dict.get("initialized", False))
        self.fingerprint = state_dict.get("fingerprint")
        self.report = list(state_dict.get("report", []))
