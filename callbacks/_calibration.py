"""Glue shared by the GuardSpace callbacks: where prompts, tokenizer and the model's forward come from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guardspace_pl.distributed import all_reduce_sum_, rank
from guardspace_pl.lora import LoraTarget
from guardspace_pl.prompts import PromptFormat, encode_prompts

CalibrationKind = Literal["subspace", "null_space"]


def check_strategy(trainer: "pl.Trainer", callback: str) -> None:
    """FSDP1 and DeepSpeed flatten parameters and gradients into 1-D shards: row-wise math would be wrong there."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"{callback} does not support {type(trainer.strategy).__name__}: it shards flattened parameters, so "
            "the adapters' rows are not whole on any rank. Use FSDP2 instead: "
            "strategy=ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1)."
        )


def find_causal_lm(pl_module: nn.Module) -> nn.Module:
    """The outermost PEFT or Hugging Face model inside the LightningModule: what calibration runs."""
    for module in pl_module.modules():
        if isinstance(module, (PeftModel, PreTrainedModel)):
            return module
    raise ValueError(
        f"{type(pl_module).__name__} holds no Hugging Face/PEFT model: GuardSpace callbacks need one to run "
        "the calibration prompts through."
    )


def resolve_tokenizer(
    tokenizer: Union[None, str, PreTrainedTokenizerBase], trainer: "pl.Trainer", pl_module: "pl.LightningModule"
) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, str):
        from guardspace_pl.loading import load_tokenizer

        return load_tokenizer(tokenizer)
    if tokenizer is not None:
        return tokenizer
    for owner in (trainer.datamodule, pl_module):
        found = getattr(owner, "tokenizer", None) if owner is not None else None
        if found is not None:
            return found
    raise ValueError(
        "No tokenizer for the calibration prompts: pass tokenizer= to the callback, or use a DataModule or "
        "LightningModule with a `tokenizer` attribute."
    )


def resolve_prompts(prompts: Optional[Sequence[str]], kind: CalibrationKind, trainer: "pl.Trainer") -> list[str]:
    if prompts is not None:
        return list(prompts)
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "calibration_prompts"):
        return list(datamodule.calibration_prompts(kind))
    raise ValueError(
        "No calibration prompts: pass calibration_prompts= (a list of harmful prompts) to the callback, or use "
        "guardspace_pl.datamodules.GuardSpaceDataModule, which serves them."
    )


def resolve_prompt_format(prompt_format: Optional[PromptFormat], trainer: "pl.Trainer") -> PromptFormat:
    """Explicit setting, else the DataModule's training format (calibrate as the model is trained), else raw."""
    if prompt_format is not None:
        return prompt_format
    return getattr(trainer.datamodule, "prompt_format", None) or "raw"


def calibration_token_ids(
    prompts: Optional[Sequence[str]],
    tokenizer: Union[None, str, PreTrainedTokenizerBase],
    prompt_format: Optional[PromptFormat],
    max_length: int,
    kind: CalibrationKind,
    trainer: "pl.Trainer",
    pl_module: "pl.LightningModule",
) -> tuple[list[list[int]], PreTrainedTokenizerBase, PromptFormat]:
    tok = resolve_tokenizer(tokenizer, trainer, pl_module)
    fmt = resolve_prompt_format(prompt_format, trainer)
    ids = encode_prompts(tok, resolve_prompts(prompts, kind, trainer), fmt, max_length)
    return ids, tok, fmt


def weight_statistics(targets: Sequence[LoraTarget]) -> Tensor:
    """Per-layer ``(sum, sum of squares)`` of the frozen weights, reduced over shards: a cheap identity."""
    from guardspace_pl.distributed import local_tensor

    stats = torch.stack(
        [torch.stack([local_tensor(t.base.weight).double().sum(), local_tensor(t.base.weight).double().pow(2).sum()]) for t in targets]
    )
    all_reduce_sum_(stats)
    # Rounded so that a different summation order (another shard layout) gives the same cache key.
    return torch.tensor([float(f"{v:.8e}") for v in stats.flatten().tolist()], dtype=torch.float64)


def default_output_path(trainer: "pl.Trainer", filename: str, explicit: Optional[str]) -> Path:
    if explicit:
        return Path(explicit)
    return Path(trainer.log_dir or trainer.default_root_dir) / "guardspace" / filename


def write_json(path: Path, payload: Any) -> None:
    if rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    if rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
