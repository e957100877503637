"""``AsFTRegularizer``: penalise the part of the LoRA update outside the alignment direction (AsFT, AAAI 2026)."""

from __future__ import annotations

from typing import Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from typing_extensions import override

from guardspace_pl.asft import alignment_factors, asft_value_and_grads, check_asft_settings
from guardspace_pl.distributed import full_tensor
from guardspace_pl.lora import LoraTarget
from guardspace_pl.safety_reference import SafetyReference, as_safety_reference

from .base import LoraCallback, loss_scale


class AsFTRegularizer(LoraCallback):
    r"""AsFT: add the exact gradient of ``lambda * sum_l ||M_l B_l A_l||_F^2`` every micro-batch.

    ``M = I - C``, ``C = V V^T / ||V||_F`` from the alignment vector ``V`` of each LoRA layer (the
    ``SafetyReference``), as in the official code (PKU-YuanGroup/AsFT): the term is not divided by the
    accumulation count and the LoRA scale ``s`` is omitted. The gradients ``d/dB = 2 lambda Q B (A A^T)`` and
    ``d/dA = 2 lambda (B^T Q B) A`` (``Q = M^T M = I - 2C + C^2``) are added in ``on_after_backward`` from ``r x r``
    products; no ``d_out x d_out`` matrix is formed, and the loss and graph of the LightningModule are untouched, so
    it composes with any LightningModule. With ``16-mixed`` the gradients are still scaled by the GradScaler at this
    hook, so the added gradient is multiplied by the current scale; ``bf16-mixed`` and ``32-true`` have no scaler.
    It acts first among the gradient edits (before ``SafetyGradientProjection`` and ``NullSpaceProjection``, which
    run in ``on_before_optimizer_step``). Logs ``asft/regularizer`` (the value of the term, lambda included).

    ``C`` is not a projector (its eigenvalues are ``sigma_i^2 / ||V||_F``), so the faithful term also penalises
    updates along ``V`` unless ``V`` is rank one with unit norm; ``projector="orthonormal"`` uses ``C = U U^T``
    (``M`` a true projection onto the complement of ``V``'s column space).

    Args:
        reference: a ``SafetyReference``, or the directory of a PEFT safety-patch adapter to build one from.
        regularization_weight: lambda >= 0 (official scripts: 1; the paper sweeps 0.1, 1, 10).
        projector: ``"faithful"`` (the official ``C``) or ``"orthonormal"``.
        divide_by_accumulation: divide the term by ``accumulate_grad_batches`` like the task loss (the official
            code does not).
        missing_modules: ``"error"`` when a trained LoRA layer has no alignment vector, or ``"skip"`` to leave it
            unregularised (with the reference's warning).
        adapter_name: the PEFT adapter to regularise (default: the single active one).
    """

    state_settings = ("regularization_weight", "projector", "divide_by_accumulation")

    def __init__(
        self,
        reference: Union[SafetyReference, str],
        regularization_weight: float = 1.0,
        projector: Literal["faithful", "orthonormal"] = "faithful",
        divide_by_accumulation: bool = False,
        missing_modules: Literal["error", "skip"] = "error",
        adapter_name: Optional[str] = None,
    ) -> None:
        super().__init__(adapter_name)
        check_asft_settings(regularization_weight, projector)
        if missing_modules not in ("error", "skip"):
            raise ValueError(f"missing_modules must be 'error' or 'skip', got {missing_modules!r}.")
        self.reference = as_safety_reference(reference)
        self.regularization_weight = float(regularization_weight)
        self.projector = projector
        self.divide_by_accumulation = divide_by_accumulation
        self.missing_modules = missing_modules
        #: per regularised layer: (target, U, w or None)
        self._factors: list[tuple[LoraTarget, Tensor, Optional[Tensor]]] = []
        self.last_value: Optional[float] = None

    @override
    def reset(self) -> None:
        super().reset()
        self._factors = []
        self.last_value = None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        targets = self.lora_targets(pl_module)
        if self.missing_modules == "error":
            uncovered = [t.hf_name for t in targets if t.hf_name not in self.reference]
            if uncovered:
                raise ValueError(
                    f"AsFTRegularizer: the safety reference ({self.reference.source}) has no alignment vector for "
                    f"{len(uncovered)} trained LoRA layer(s), e.g. {uncovered[:3]}. Build the reference for the same "
                    "target_modules, or pass missing_modules='skip' to leave them unregularised."
                )
        device = full_tensor(targets[0].lora_A).device
        self._factors = []
        for target, vector in self.reference.for_targets(targets):
            if vector is None:
                continue
            basis, sigma = vector.spectrum()
            basis, weights = alignment_factors(basis, sigma, vector.norm(), self.projector)
            self._factors.append(
                (target, basis.float().to(device), None if weights is None else weights.float().to(device))
            )

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        factor = 1.0
        if self.divide_by_accumulation:
            factor /= trainer.accumulate_grad_batches
        grad_scale = loss_scale(trainer)  # 16-mixed: the gradients are still scaled at this hook
        total = 0.0
        with torch.no_grad():
            for target, basis, weights in self._factors:
                lora_A, lora_B = full_tensor(target.lora_A), full_tensor(target.lora_B)
                value, grad_A, grad_B = asft_value_and_grads(
                    lora_A.float(), lora_B.float(), basis, weights, self.regularization_weight * factor
                )
                total += value.item()
                _add_grad_(target.lora_A, grad_A * grad_scale)
                _add_grad_(target.lora_B, grad_B * grad_scale)
        self.last_value = total
        pl_module.log("asft/regularizer", total, on_step=True, on_epoch=False, batch_size=1)


def _add_grad_(param: torch.nn.Parameter, full_grad: Tensor) -> None:
    """``param.grad += full_grad``; under FSDP2 each rank adds only the rows of its own shard."""
    if isinstance(param, DTensor):
        shard = distribute_tensor(full_grad.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        if param.grad is None:
            param.grad = shard
        else:
            param.grad.to_local().add_(shard.to_local())
        return
    if param.grad is None:
        param.grad = full_grad.to(param.dtype)
    else:
        param.grad.add_(full_grad.to(param.grad.dtype))
