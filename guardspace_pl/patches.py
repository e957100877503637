"""Put safety-patch adapters on a model: merged into its weights, or loaded as active or inactive PEFT adapters.

A safety patch (``python -m guardspace_pl align``) is an ordinary PEFT LoRA adapter. Patches stack: applying
``[a, b]`` merges ``a`` then ``b`` (each is ``W <- W + s B A``, so the order does not change the result), which is
how a patch is re-applied after task fine-tuning or a second red-team round is added. Every application is
recorded in the model config (``guardspace_safety_patches``: each patch's content fingerprint), which survives
``save_pretrained``; applying a patch the model already carries is an error, since adding the same update twice
doubles it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from peft import PeftModel
from torch import nn

#: The model-config attribute that records the patches applied to a model (content fingerprints, in order).
APPLIED_PATCHES_KEY = "guardspace_safety_patches"
PatchMode = Literal["merged", "active", "inactive"]
PATCH_MODES = ("merged", "active", "inactive")


class PatchError(ValueError):
    """A safety patch that cannot be applied to this model (wrong base, applied twice, not a LoRA adapter)."""


def _weights_file(directory: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (directory / name).exists():
            return directory / name
    raise PatchError(
        f"{directory} holds no adapter weights (adapter_model.safetensors): pass the folder `align` wrote the patch to "
        "(<output_dir>/patch), or any PEFT LoRA adapter folder."
    )


def read_patch_config(directory: Union[str, Path]) -> dict:
    """The ``adapter_config.json`` of a LoRA safety patch, checked to be a plain LoRA adapter.

    Args:
        directory: the patch's folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    """
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise PatchError(
            f"{directory} is not a PEFT adapter folder (no adapter_config.json); pass a safety patch's folder."
        )
    _weights_file(directory)
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise PatchError(f"{directory} is a {config.get('peft_type')} adapter; a safety patch must be a LoRA adapter.")
    if config.get("use_dora"):
        raise PatchError(f"{directory} is a DoRA adapter: its update is not s B A. Train the patch as plain LoRA.")
    return config


def patch_fingerprint(directory: Union[str, Path]) -> str:
    """A content hash of the patch (its weights file), the same wherever the folder is copied to.

    Args:
        directory: the patch's folder.
    """
    digest = hashlib.sha256(_weights_file(Path(directory)).read_bytes()).hexdigest()
    return digest[:16]


def applied_patches(model: nn.Module) -> list[str]:
    """Fingerprints of the patches already applied to ``model`` (merged or loaded), in order.

    Args:
        model: a Hugging Face model or a ``PeftModel`` over one.
    """
    config = _hf_model(model).config
    return list(getattr(config, APPLIED_PATCHES_KEY, None) or [])


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _patch_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``module path -> (lora_A shape, lora_B shape)`` of the patch's layers, read without loading the tensors."""
    path = _weights_file(directory)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    else:
        import torch

        shapes = {key: tuple(t.shape) for key, t in torch.load(path, map_location="cpu", weights_only=True).items()}
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}."
            if marker in key:
                name = key.split(marker)[0].removeprefix("base_model.model.")
                layers.setdefault(name, {})[factor] = shape
    return {name: (f.get("lora_A", ()), f.get("lora_B", ())) for name, f in layers.items()}


def check_patch_fits(model: nn.Module, directory: Union[str, Path]) -> None:
    """Error naming the first mismatch if the patch was made for another base model (missing module, other shape).

    Args:
        model: the model the patch is meant for (Hugging Face or ``PeftModel``).
        directory: the patch's folder.
    """
    directory = Path(directory)
    hf_model = _hf_model(model)
    linears = {}
    for name, module in hf_model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            linears[name.replace(".base_layer", "")] = (base.out_features, base.in_features)
    layers = _patch_shapes(directory)
    if not layers:
        raise PatchError(f"{directory} holds no LoRA layers (no lora_A / lora_B weights).")
    for name, (shape_a, shape_b) in sorted(layers.items()):
        if name not in linears:
            example = next(iter(sorted(linears)), "none")
            raise PatchError(
                f"The patch {directory} adapts {name!r}, which this {type(hf_model).__name__} does "
                "not have (its linear "
                f"layers are named like {example!r}): the patch was made for another base model. "
                "Apply it to the model it "
                "was trained on."
            )
        out_features, in_features = linears[name]
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[1] != in_features or shape_b[0] != out_features:
            raise PatchError(
                f"The patch {directory} does not fit this model: {name} is {out_features} x "
                f"{in_features} here, but the "
                f"patch's factors are A {shape_a}, B {shape_b} (shape mismatch). It was made for another base model; "
                "apply it to the model it was trained on."
            )


def apply_patches(
    model: nn.Module,
    patches: Sequence[Union[str, Path]],
    mode: PatchMode = "merged",
    adapter_names: Optional[Sequence[str]] = None,
    allow_repeat: bool = False,
) -> nn.Module:
    """Apply safety patches to ``model`` and return the result.

    ``merged`` returns a plain Hugging Face model with every patch added to its weights (deploy, or fine-tune on top
    of it: ``GuardSpaceLM(safety_patches=[...])`` does this before attaching its LoRA). ``active`` and ``inactive``
    return a ``PeftModel`` with each patch loaded as a frozen adapter named ``safety_patch_<i>`` (or
    ``adapter_names``): ``active`` turns them all on together (stacked), ``inactive`` loads them switched off, for a
    method that reads a patch as its safety reference while the model computes the original function.

    Args:
        model: a Hugging Face causal LM (``merged`` also accepts a ``PeftModel``, whose adapters are merged first).
        patches: folders of PEFT LoRA adapters (e.g. ``align``'s ``<output_dir>/patch``), applied in order.
        mode: ``merged``, ``active`` or ``inactive``.
        adapter_names: PEFT adapter names for ``active``/``inactive`` (default ``safety_patch_0``, ...).
        allow_repeat: apply a patch the model already carries once more (e.g. re-applying the aligned start's own
            patch after fine-tuning from it adds ``s B A`` a second time, on purpose).
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"Unknown patch mode {mode!r}; use one of {list(PATCH_MODES)}.")
    if isinstance(patches, (str, Path)):
        raise TypeError(f"patches must be a list of folders, not one path; wrap it: [{str(patches)!r}].")
    directories = [Path(p) for p in patches]
    if adapter_names is not None and len(adapter_names) != len(directories):
        raise ValueError(f"Got {len(adapter_names)} adapter names for {len(directories)} patches; pass one per patch.")
    names = list(adapter_names) if adapter_names is not None else [f"safety_patch_{i}" for i in range(len(directories))]
    fingerprints = []
    already = applied_patches(model)
    for directory in directories:
        if not directory.is_dir():
            raise FileNotFoundError(f"Safety patch folder {directory} does not exist.")
        read_patch_config(directory)
        fingerprint = patch_fingerprint(directory)
        if not allow_repeat and (fingerprint in already or fingerprint in fingerprints):
            raise PatchError(
                f"The patch {directory} (fingerprint {fingerprint}) is already applied to this model: "
                "applying it again would "
                "add its update twice. Apply each patch once (the model config's "
                "guardspace_safety_patches lists what it carries), "
                "or pass allow_repeat=True to add it again on purpose."
            )
        check_patch_fits(model, directory)
        fingerprints.append(fingerprint)
    if not directories:
        return model
    if mode == "merged":
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        for directory, name in zip(directories, names):
            model = PeftModel.from_pretrained(
                model, str(directory), adapter_name=name, is_trainable=False
            ).merge_and_unload()
    else:
        if isinstance(model, PeftModel):
            raise PatchError(
                "The model already carries PEFT adapters: load patches as adapters onto the plain model, or use "
                "mode='merged' to add them to its weights."
            )
        peft_model = PeftModel.from_pretrained(model, str(directories[0]), adapter_name=names[0], is_trainable=False)
        for directory, name in zip(directories[1:], names[1:]):
            peft_model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        if mode == "active":
            peft_model.base_model.set_adapter(names)  # every patch on at once: their updates add up
        else:
            peft_model.base_model.set_adapter([])  # loaded, switched off: the model computes the original function
        for parameter in peft_model.parameters():
            parameter.requires_grad_(False)
        model = peft_model
    config = _hf_model(model).config
    setattr(config, APPLIED_PATCHES_KEY, already + fingerprints)
    return model


__all__ = [
    "APPLIED_PATCHES_KEY",
    "PATCH_MODES",
    "PatchError",
    "applied_patches",
    "apply_patches",
    "check_patch_fits",
    "patch_fingerprint",
    "read_patch_config",
]
