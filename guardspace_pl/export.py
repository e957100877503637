"""Export a GuardSpace-trained model as a standard PEFT adapter on the ORIGINAL base, or as a merged model.

After GuardSpace training a LoRA layer computes ``(W' + s B A) x`` with ``W' = W - s B0 A0``: the frozen
residual written by ``SafetySubspaceInit`` (``A0`` already projected by ``NullSpaceProjection``), ``W`` the
original weight. A plain ``save_pretrained`` adapter is relative to ``W'``, which users do not have. The
trained model differs from the original by ``s (B A - B0 A0)``, a rank ``<= 2r`` update per layer: it is
re-factored here exactly and written as an ordinary LoRA adapter of rank ``2r`` (scaling 1) that loads
with ``PeftModel.from_pretrained(original_base, directory)``.

CLI::

    python -m guardspace_pl.export --checkpoint last.ckpt --out exported/ --kind adapter [--base MODEL]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guardspace_pl.distributed import full_tensor
from guardspace_pl.distributed import rank as process_rank
from guardspace_pl.loading import load_causal_lm
from guardspace_pl.lora import LoraTarget, find_lora_targets
from guardspace_pl.model import GuardSpaceLM

log = logging.getLogger(__name__)

#: Above this size the factorisation first finds the range of the update (exact for rank <= k), then
#: decomposes a (k + oversample) x n matrix: full float64 SVDs of every 4096 x 11008 weight of a 7B model
#: would dominate the export.
_FULL_SVD_MAX_DIM = 1024
_OVERSAMPLE = 8


# ---------------------------------------------------------------------------------------------- math
@torch.no_grad()
def lora_delta_factors(trained_delta: Tensor, rank: int, randomized: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Factor ``trained_delta`` (m x n) as ``lora_B @ lora_A`` with ``lora_A`` k x n, ``lora_B`` m x k, k = ``rank``.

    A truncated SVD in float64, the singular values split evenly (``B = U sqrt(S)``, ``A = sqrt(S) V^T``):
    exact when the matrix has rank ``<= k``, the best rank-k approximation otherwise. The factors are for
    LoRA scaling 1 (``lora_alpha == r``). ``randomized`` (default: only for large matrices) first projects
    onto the range of the matrix with a seeded Gaussian sketch and two power iterations; that is exact
    for rank ``<= k`` too, and far cheaper than a full SVD of a large weight.
    """
    if trained_delta.ndim != 2:
        raise ValueError(f"Expected a matrix, got a tensor of shape {tuple(trained_delta.shape)}.")
    m, n = trained_delta.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 1 and min(m, n) = {min(m, n)}, got {rank}.")
    delta = trained_delta.double()
    sketch = rank + _OVERSAMPLE
    if randomized is None:
        randomized = min(m, n) > _FULL_SVD_MAX_DIM and sketch < min(m, n)
    if randomized:
        generator = torch.Generator(device=delta.device).manual_seed(0)  # deterministic exports
        omega = torch.randn(n, min(sketch, n), dtype=delta.dtype, device=delta.device, generator=generator)
        q = torch.linalg.qr(delta @ omega).Q
        for _ in range(2):  # power iterations sharpen the range when the tail is noise (rounding of W')
            q = torch.linalg.qr(delta.T @ q).Q
            q = torch.linalg.qr(delta @ q).Q
        u_small, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
        u = q @ u_small
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    lora_B = u[:, :rank] * root
    lora_A = root[:, None] * vh[:rank]
    return lora_A, lora_B


# -------------------------------------------------------------------------------------------- lookup
def _peft_model(module_or_model: nn.Module) -> Optional[PeftModel]:
    if isinstance(module_or_model, PeftModel):
        return module_or_model
    return next((m for m in module_or_model.modules() if isinstance(m, PeftModel)), None)


def _hf_model(module_or_model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model that carries the LoRA layers: module names relative to it match the original's."""
    peft_model = _peft_model(module_or_model)
    if peft_model is not None:
        return peft_model.get_base_model()
    for module in module_or_model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(
        f"{type(module_or_model).__name__} holds no PEFT or Hugging Face model: export needs a model adapted with "
        "peft.get_peft_model (a GuardSpaceLM, a PeftModel, or a LightningModule that holds one)."
    )


def _original_name(trained_name: str) -> str:
    """``...q_proj.base_layer.weight`` -> ``...q_proj.weight``: PEFT's wrapper adds one level."""
    return trained_name.replace(".base_layer.", ".")


def _check_frozen_parameters(trained: PreTrainedModel, original: PreTrainedModel, lora_weight_names: set[str]) -> None:
    """Every tensor but the LoRA factors and the LoRA layers' weights must equal the original's."""
    original_state = original.state_dict()
    unknown, differ = [], []
    for name, tensor in trained.state_dict().items():
        if "lora_" in name:
            continue
        key = _original_name(name)
        if key in lora_weight_names:
            continue  # W': compared through the delta
        if key not in original_state:
            unknown.append(name)
            continue
        reference = full_tensor(original_state[key])
        tensor = full_tensor(tensor)
        if reference.shape != tensor.shape:
            raise ValueError(
                f"The base model does not match the trained one: {key} has shape {tuple(reference.shape)} in the base "
                f"and {tuple(tensor.shape)} in the trained model. Pass the base the adapter was trained on."
            )
        if not torch.equal(reference.to(device=tensor.device, dtype=tensor.dtype), tensor):
            differ.append(key)
    if unknown:
        raise ValueError(
            f"Tensors of the trained model have no counterpart in the base model: {unknown[:5]} "
            f"({len(unknown)} in all). Is it the same architecture? (modules_to_save is not supported.)"
        )
    if differ:
        raise ValueError(
            f"Non-LoRA tensors of the trained model differ from the base model: {differ[:5]} ({len(differ)} in all). "
            "A LoRA adapter cannot carry them: pass the base the adapter was trained on, or use --kind merged."
        )


# -------------------------------------------------------------------------------------------- export
@dataclass
class AdapterExport:
    """What :func:`export_peft_adapter` wrote, and how exactly the factors reproduce each layer's update."""

    directory: Path
    rank: int
    #: per layer: ``||delta - B A||_F / ||W||_F`` (rounding of ``W'`` only, unless the base is wrong)
    residuals: dict[str, float] = field(default_factory=dict)

    @property
    def max_residual(self) -> float:
        return max(self.residuals.values(), default=0.0)


def _default_tolerance(*dtypes: torch.dtype) -> float:
    # W' was rounded to its dtype once (and the base may have been loaded in another dtype): a few eps of |W|.
    return 10 * max(torch.finfo(d).eps for d in dtypes)


@torch.no_grad()
def export_peft_adapter(
    module_or_model: nn.Module,
    original_base: PreTrainedModel,
    directory: Union[str, Path],
    adapter_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    tolerance: Optional[float] = None,
    extra_ranks: Optional[Mapping[str, int]] = None,
) -> AdapterExport:
    """Write a standard PEFT LoRA adapter that turns ``original_base`` into the trained model.

    For every LoRA layer ``delta = W' + s B A - W`` (float64) is factored at rank ``min(2r, m, n)`` with
    scaling 1. ``original_base`` is not modified. Raises ``ValueError`` when the base does not match the
    trained model: other shapes, other non-LoRA tensors, or a ``delta`` that is not of rank ``<= 2r``
    (relative residual above ``tolerance``, default ten machine epsilons of the weights' dtype).

    Args:
        module_or_model: a GuardSpaceLM, a PeftModel, or any module holding one.
        original_base: the model the training started from (the weights ``W``), e.g. a fresh
            ``AutoModelForCausalLM.from_pretrained(model_name_or_path)``.
        directory: where ``adapter_config.json`` and ``adapter_model.safetensors`` go.
        adapter_name: the trained adapter to export (default: the single active one).
        dtype: dtype of the saved factors (default: that of the trained LoRA weights).
        tolerance: largest allowed relative residual of a layer's re-factored update (default: ten machine epsilons
            of the weights' dtype).
        extra_ranks: module name -> rank to allow beyond ``2r`` for that layer (a method that folded a known
            low-rank term into the frozen weight, e.g. LSSF); default none.
    """
    trained = _hf_model(module_or_model)
    targets = find_lora_targets(trained, adapter_name)
    original_modules = dict(original_base.named_modules())
    _check_frozen_parameters(trained, original_base, {f"{t.name}.weight" for t in targets})

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    residuals: dict[str, float] = {}
    for target in targets:
        _check_plain_lora(target)
        original = original_modules.get(target.name)
        if not isinstance(original, nn.Linear):
            raise ValueError(
                f"The base model has no nn.Linear {target.name!r}: pass the base the adapter was trained on."
            )
        weight, lora_A, lora_B = target.full()
        original_weight = full_tensor(original.weight).to(weight.device)
        if original_weight.shape != weight.shape:
            raise ValueError(
                f"The base model does not match the trained one: {target.name} is {tuple(original_weight.shape)} in "
                f"the base and {tuple(weight.shape)} in the trained model. Pass the base the adapter was trained on."
            )
        delta = weight.double() + target.scaling * (lora_B.double() @ lora_A.double()) - original_weight.double()
        k = min(2 * target.rank + (extra_ranks or {}).get(target.hf_name, 0), *delta.shape)
        new_A, new_B = lora_delta_factors(delta, k)
        scale = original_weight.double().norm().clamp_min(1e-30)
        residuals[target.name] = ((delta - new_B @ new_A).norm() / scale).item()
        limit = tolerance if tolerance is not None else _default_tolerance(weight.dtype, original_weight.dtype)
        if residuals[target.name] > limit:
            raise ValueError(
                f"{target.name}: the trained weight differs from the base's by more than a rank-{k} update "
                f"(relative residual {residuals[target.name]:.2e} > {limit:.1e}): the base is not the model this "
                "adapter was trained from."
            )
        out_dtype = dtype or lora_A.dtype
        factors[target.name] = (new_A.to(out_dtype).cpu().contiguous(), new_B.to(out_dtype).cpu().contiguous())

    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    rank = max(ranks.values())
    config = _export_config(module_or_model, original_base, targets, ranks, rank)
    if process_rank() == 0:  # under FSDP2 every rank computed the same factors from all-gathered weights
        _save_adapter(original_base, config, factors, Path(directory))
    log.info(
        "Exported a rank-%d PEFT adapter for %d layers to %s (max residual %.1e).",
        rank, len(factors), directory, max(residuals.values()),
    )
    return AdapterExport(Path(directory), rank, residuals)


def _check_plain_lora(target: LoraTarget) -> None:
    if target.layer.use_dora.get(target.adapter, False):
        raise NotImplementedError(
            f"{target.name} uses DoRA: its update is not W' + s B A; export it with --kind merged."
        )


def _export_config(
    module_or_model: nn.Module,
    original_base: PreTrainedModel,
    targets: list[LoraTarget],
    ranks: dict[str, int],
    rank: int,
) -> LoraConfig:
    """Rank ``2r``, ``lora_alpha = r`` (scaling 1), on exactly the trained model's LoRA layers."""
    peft_model = _peft_model(module_or_model)
    trained_config = peft_model.peft_config[targets[0].adapter] if peft_model is not None else None
    names = [t.name for t in targets]
    leaves = sorted({name.split(".")[-1] for name in names})
    linear_names = {n for n, m in original_base.named_modules() if isinstance(m, nn.Linear)}
    # Leaf names read well in adapter_config.json; full names only when the trained layers are a subset.
    selects_same = {n for n in linear_names if n.split(".")[-1] in leaves} == set(names)
    odd = {name: r for name, r in ranks.items() if r != rank}  # layers smaller than 2r (capped at min(m, n))
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern={_exact(name): r for name, r in odd.items()},
        alpha_pattern={_exact(name): r for name, r in odd.items()},
        target_modules=leaves if selects_same else names,
        lora_dropout=getattr(trained_config, "lora_dropout", 0.0),
        bias="none",
        task_type=getattr(trained_config, "task_type", None) or "CAUSAL_LM",
    )


def _exact(name: str) -> str:
    # PEFT matches rank_pattern keys as regexes against the end of module names.
    return "^" + name.replace(".", r"\.") + "$"


def _save_adapter(
    original_base: PreTrainedModel, config: LoraConfig, factors: dict[str, tuple[Tensor, Tensor]], directory: Path
) -> None:
    """Save through PEFT itself (its key names and config format), on a weightless copy of the base."""
    with torch.device("meta"):
        skeleton = type(original_base)(copy.deepcopy(original_base.config))
    peft_skeleton = get_peft_model(skeleton, config)
    names = {id(p): n for n, p in peft_skeleton.named_parameters()}
    state: dict[str, Tensor] = {}
    for target in find_lora_targets(peft_skeleton.get_base_model()):
        if target.name not in factors:
            raise RuntimeError(f"The exported config adapts {target.name!r}, which the trained model does not.")
        lora_A, lora_B = factors.pop(target.name)
        if lora_A.shape != target.lora_A.shape or lora_B.shape != target.lora_B.shape:
            raise RuntimeError(
                f"{target.name}: factor shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit PEFT's layer."
            )
        state[names[id(target.lora_A)]] = lora_A
        state[names[id(target.lora_B)]] = lora_B
    if factors:
        raise RuntimeError(f"The exported config misses trained LoRA layers {sorted(factors)[:5]}.")
    peft_skeleton.save_pretrained(str(directory), state_dict=state)


@torch.no_grad()
def export_merged_model(
    module_or_model: nn.Module,
    directory: Union[str, Path],
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    safe_serialization: bool = True,
) -> Path:
    """Merge the adapter into a copy of the model (``W' + s B A``) and save it as a plain Hugging Face model.

    The merged model computes the trained model's function and loads with ``AutoModelForCausalLM``. The copy
    costs one model's memory; ``module_or_model`` is left as it is. The tokenizer is saved alongside when one
    is given or the module has one.
    """
    peft_model = _peft_model(module_or_model)
    if peft_model is None:
        raise ValueError(f"{type(module_or_model).__name__} holds no PeftModel: there is no adapter to merge.")
    if any(isinstance(p, DTensor) for p in peft_model.parameters()):
        raise ValueError(
            "The model is sharded (FSDP2): export the merged model from a checkpoint with the CLI instead."
        )
    merged = copy.deepcopy(peft_model).merge_and_unload()
    directory = Path(directory)
    merged.save_pretrained(str(directory), safe_serialization=safe_serialization)
    tokenizer = tokenizer or _module_tokenizer(module_or_model)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    log.info("Saved the merged model to %s.", directory)
    return directory


def _module_tokenizer(module: nn.Module) -> Optional[PreTrainedTokenizerBase]:
    tokenizer = getattr(module, "_tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    try:
        return getattr(module, "tokenizer", None)  # GuardSpaceLM loads it lazily from model_name_or_path
    except (OSError, ValueError) as error:
        log.warning("No tokenizer saved with the merged model: %s", error)
        return None


# ----------------------------------------------------------------------------------------------- CLI
def load_checkpoint_module(checkpoint: Union[str, Path], base: Optional[str] = None) -> GuardSpaceLM:
    """Rebuild the ``GuardSpaceLM`` of a Lightning checkpoint: hyperparameters, base model, trained state.

    Args:
        checkpoint: a Lightning ``.ckpt`` file, or the folder of a sharded (DCP) checkpoint.
        base: the base model to build the module on instead of the checkpoint's ``model_name_or_path`` (the
            same model, moved or copied elsewhere); None keeps the recorded one.
    """
    path = Path(checkpoint)
    if path.is_dir():
        # A sharded (DCP) checkpoint of ModelParallelStrategy: gather it into one state dict on the CPU, as
        # Lightning's own `consolidate_checkpoint` utility does.
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        ckpt = _load_distributed_checkpoint(path)
    elif path.is_file():
        ckpt = _safe_torch_load(path)
    else:
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint of a GuardSpaceLM (no state_dict/hyper_parameters).")
    # LightningCLI adds private entries (``_instantiator``) that are not constructor arguments.
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    if base is not None and base != hparams.get("model_name_or_path"):
        # The recorded path may not exist any more (a moved base): build on the one given; its gguf_file was the
        # old one's.
        hparams["model_name_or_path"] = base
        hparams["gguf_file"] = None
    module = GuardSpaceLM(**hparams)
    module.configure_model()
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as error:
        if base is not None:
            raise ValueError(
                f"The base model does not match the trained one: {path} does not fit a model built on {base} "
                f"({str(error).splitlines()[-1].strip()}). Pass the base the adapter was trained on."
            ) from error
        raise ValueError(f"{path} does not fit the model built from its hyperparameters: {error}") from error
    module.eval()
    return module


def _safe_torch_load(path: Path) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True``: tensors and plain containers, never arbitrary code.

    A checkpoint is a pickle, and unpickling runs whatever callables it names; an exported model is often
    built from a file someone else wrote. Lightning's own checkpoints hold only tensors, numbers, strings and
    containers, so nothing needs to be allowed beyond what ``weights_only`` accepts.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which could run code when loaded, so "
            f"it was not loaded ({str(error).splitlines()[0]}). Export checkpoints written by a guardspace_pl "
            "fit; if you wrote this file yourself and trust it, re-save its state_dict and hyper_parameters as "
            "plain data."
        ) from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m guardspace_pl.export",
        description=(
            "Export a GuardSpace checkpoint as a PEFT adapter on the original base model, or as a merged model."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint (.ckpt) of a GuardSpaceLM run.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument(
        "--kind", required=True, choices=("adapter", "merged"),
        help=(
            "adapter: rank-2r LoRA adapter relative to the ORIGINAL base; merged: full model with the adapter "
            "merged in."
        ),
    )
    parser.add_argument(
        "--base", default=None,
        help="Original base model (default: the checkpoint's model_name_or_path); the checkpoint is also loaded on "
        "it, so a moved or copied base works.",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Command-line entry point; user errors exit with status 2 and a one-line message."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.kind == "merged" and (Path(args.out) / "adapter_config.json").exists():
            # from_pretrained on that folder would load the old adapter (on its base), not the merged model.
            raise ValueError(
                f"{args.out} holds a PEFT adapter (adapter_config.json): a merged model written there would be "
                "shadowed by it. Export into an empty folder, or delete the adapter first."
            )
        module = load_checkpoint_module(args.checkpoint, args.base)
        if args.kind == "merged":
            out = export_merged_model(module, args.out)
        else:
            hp = module.hparams
            original = load_causal_lm(
                hp.model_name_or_path, hp.gguf_file, hp.dtype, hp.attn_implementation, hp.trust_remote_code
            )
            out = export_peft_adapter(module, original, args.out).directory
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps({"kind": args.kind, "out": str(out)}))
    return out


if __name__ == "__main__":
    main()
