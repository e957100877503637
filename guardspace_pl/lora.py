"""Find the PEFT LoRA layers of any model and read or write their tensors, sharded or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from guardspace_pl.distributed import full_tensor, write_full_

# Wrapper prefixes that torch.compile, activation checkpointing and PEFT add to module names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_module_name(name: str) -> str:
    """The module's name as the user sees it in the unwrapped Hugging Face model."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@dataclass
class LoraTarget:
    """One PEFT LoRA layer over an ``nn.Linear`` and the adapter GuardSpace acts on."""

    name: str
    layer: LoraLayer
    adapter: str

    @property
    def hf_name(self) -> str:
        """The module's name inside the Hugging Face model (``model.layers.0.self_attn.q_proj``), whatever wraps it.

        PEFT nests the model as ``base_model.model``; a LightningModule adds its own attribute names. Safety
        references, checkpoints and adapters are matched by this name, never by parameter order.
        """
        return self.name.rsplit("base_model.model.", 1)[-1]

    @property
    def base(self) -> nn.Linear:
        return self.layer.get_base_layer()

    @property
    def lora_A(self) -> nn.Parameter:
        return self.layer.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return int(self.layer.r[self.adapter])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.out_features, self.base.in_features)

    def full(self) -> tuple[Tensor, Tensor, Tensor]:
        """Unsharded ``(W, lora_A, lora_B)``; a collective under FSDP2."""
        return full_tensor(self.base.weight), full_tensor(self.lora_A), full_tensor(self.lora_B)

    @torch.no_grad()
    def write(
        self, weight: Optional[Tensor] = None, lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None
    ) -> None:
        """Copy full tensors into the (possibly sharded) parameters in place, keeping optimizer references."""
        if weight is not None:
            write_full_(self.base.weight, weight)
        if lora_A is not None:
            write_full_(self.lora_A, lora_A)
        if lora_B is not None:
            write_full_(self.lora_B, lora_B)


def find_lora_targets(model: nn.Module, adapter_name: Optional[str] = None) -> list[LoraTarget]:
    """Every PEFT LoRA layer of ``model``, in module order, with a clear error when there is none."""
    targets: list[LoraTarget] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        clean = clean_module_name(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"GuardSpace acts on LoRA over nn.Linear layers, but {clean!r} wraps a "
                f"{type(base).__name__}. Remove it from the LoRA target_modules."
            )
        adapters = list(module.lora_A.keys())
        if adapter_name is None:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if len(active) != 1:
                raise ValueError(
                    f"{clean!r} has active LoRA adapters {active}: pass adapter_name= to the callback to choose one."
                )
            adapter = active[0]
        elif adapter_name in adapters:
            adapter = adapter_name
        else:
            raise ValueError(f"Adapter {adapter_name!r} not found in {clean!r}; it has {adapters}.")
        targets.append(LoraTarget(name=clean, layer=module, adapter=adapter))
    if not targets:
        raise ValueError(
            "No PEFT LoRA layers found in the LightningModule. GuardSpace callbacks act on a model "
            "adapted with peft.get_peft_model(model, LoraConfig(...)) (GuardSpaceLM does this for you)."
        )
    return targets
