"""GuardSpace callbacks: compose them into any Lightning project whose model carries PEFT LoRA layers."""

from guardspace_pl.callbacks.null_space_projection import NullSpaceProjection
from guardspace_pl.callbacks.safe_lora import SafeLoRA
from guardspace_pl.callbacks.safety_subspace_init import SafetySubspaceInit

__all__ = ["NullSpaceProjection", "SafeLoRA", "SafetySubspaceInit"]
