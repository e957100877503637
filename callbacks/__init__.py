"""GuardSpace callbacks: compose them into any Lightning project whose model carries PEFT LoRA layers."""

from guardspace_pl.callbacks.asft_regularizer import AsFTRegularizer
from guardspace_pl.callbacks.lssf_fusion import LSSFFusion
from guardspace_pl.callbacks.null_space_projection import NullSpaceProjection
from guardspace_pl.callbacks.safe_lora import SafeLoRA
from guardspace_pl.callbacks.safety_gradient_projection import SafetyGradientProjection
from guardspace_pl.callbacks.safety_subspace_init import SafetySubspaceInit

__all__ = [
    "AsFTRegularizer",
    "LSSFFusion",
    "NullSpaceProjection",
    "SafeLoRA",
    "SafetyGradientProjection",
    "SafetySubspaceInit",
]
