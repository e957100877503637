"""Covariance-preconditioned SVD of a weight (GuardSpace section 1; PEFT CorDA's KPM/IPM).

Pure functions of tensors: no hooks, no modules, no Lightning. Notation (PEFT layout):
``W`` is ``m x n`` (out x in), ``lora_A`` is ``r x n``, ``lora_B`` is ``m x r`` and the adapter
adds ``s * lora_B @ lora_A`` with ``s = alpha / r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

SampleNormalization = Literal["max", "max_abs", "none"]
ComponentSelection = Literal["kpa", "ipa"]


def normalize_sample(x: Tensor, normalization: SampleNormalization = "max") -> Tensor:
    """Scale one sample's activations (``L x n``) before it enters the covariance.

    ``"max"`` divides by ``|max(X)|`` exactly as the official GuardSpace code and PEFT CorDA do;
    ``"max_abs"`` divides by ``max|X|`` (sign-robust variant); ``"none"`` leaves ``X`` as is.
    """
    if normalization == "none":
        return x
    if normalization == "max":
        scale = x.max().abs()
    elif normalization == "max_abs":
        scale = x.abs().max()
    else:
        raise ValueError(f"Unknown sample normalization {normalization!r}; use 'max', 'max_abs' or 'none'.")
    if scale == 0:
        # An all-zero sample adds nothing; dividing would turn it into NaNs.
        return x
    return x / scale


def sample_covariance(
    x: Tensor, normalization: SampleNormalization = "max", dtype: torch.dtype = torch.float32
) -> Tensor:
    """``X^T X`` (``n x n``, float32 by default) of one normalised sample ``X`` (``L x n``)."""
    x = normalize_sample(x.detach().to(dtype), normalization)
    if not torch.isfinite(x).all():
        raise ValueError(
            "Non-finite activation in a calibration sample (NaN or inf). Check the model's dtype "
            "(float16 overflows are common: use bfloat16 or float32) and the calibration prompts."
        )
    return x.T @ x


@dataclass
class DampedCovariance:
    """``C~ = C + damp * mean(diag C) * I`` and its inverse, in float64."""

    matrix: Tensor
    inverse: Tensor
    damp: float
    inverse_error: float


def damp_covariance(
    covariance: Tensor,
    damp: float = 0.01,
    tolerance: float = 0.05,
    max_doublings: int = 40,
) -> DampedCovariance:
    """Add ``damp * mean(diag C) * I``, doubling ``damp`` until ``||C~ C~^-1 - I||_F < tolerance``."""
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"Covariance must be square, got shape {tuple(covariance.shape)}.")
    if not torch.isfinite(covariance).all():
        raise ValueError("Covariance has non-finite entries; the calibration forward pass produced NaN/inf.")
    c = covariance.double()
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    mean_diag = torch.diagonal(c).mean()
    if mean_diag <= 0:
        raise ValueError(
            "Covariance is zero: the layer saw only zero inputs on the calibration prompts. "
            "Check that the calibration prompts are non-empty and reach this layer."
        )
    for _ in range(max_doublings):
        damped = c + damp * mean_diag * eye
        inverse = torch.linalg.inv(damped)
        error = torch.linalg.matrix_norm(damped @ inverse - eye).item()
        if error < tolerance:
            return DampedCovariance(damped, inverse, damp, error)
        damp *= 2
    raise ValueError(f"Covariance stays ill-conditioned after {max_doublings} damping doublings.")


@dataclass
class PreconditionedSVD:
    """``W C~ = U S V^T`` with ``V~^T = V^T C~^-1``, so that ``W = U diag(S) V~^T`` exactly.

    ``S`` is sorted in descending order (largest = safety-relevant components).
    """

    U: Tensor  # m x k
    S: Tensor  # k
    Vt_tilde: Tensor  # k x n
    damp: float


def preconditioned_svd(weight: Tensor, damped: DampedCovariance) -> PreconditionedSVD:
    """SVD of ``W C~`` in float64 (the smallest components, which the adapters use, need it)."""
    w = weight.double()
    if w.shape[1] != damped.matrix.shape[0]:
        raise ValueError(
            f"Weight has {w.shape[1]} input features but the covariance is {damped.matrix.shape[0]}x"
            f"{damped.matrix.shape[0]}: the covariance was collected on a different layer."
        )
    product = w @ damped.matrix.to(w.device)
    # On CUDA, cuSOLVER's QR-based gesvd: 16% faster than PyTorch's default route at Llama-2-7B shapes on an
    # H200 with 2e-11 relative error on the kept components; float32 and the Gram eigendecomposition are
    # faster but lose the smallest components (benchmarks/results/decomposition_llama7b_gpu.json).
    driver = "gesvd" if product.is_cuda else None
    U, S, Vh = torch.linalg.svd(product, full_matrices=False, driver=driver)
    return PreconditionedSVD(U=U, S=S, Vt_tilde=Vh @ damped.inverse.to(w.device), damp=damped.damp)


def select_components(svd: PreconditionedSVD, rank: int, selection: ComponentSelection = "kpa") -> PreconditionedSVD:
    """Keep ``rank`` components: the smallest (``kpa``, GuardSpace default) or the largest (``ipa``)."""
    k = svd.S.shape[0]
    if not 0 < rank < k + 1:
        raise ValueError(f"Rank {rank} must be between 1 and min(m, n) = {k}.")
    if selection == "kpa":
        index = slice(k - rank, k)
    elif selection == "ipa":
        index = slice(0, rank)
    else:
        raise ValueError(f"Unknown component selection {selection!r}; use 'kpa' or 'ipa'.")
    return PreconditionedSVD(U=svd.U[:, index], S=svd.S[index], Vt_tilde=svd.Vt_tilde[index], damp=svd.damp)


def adapter_from_components(components: PreconditionedSVD, scaling: float) -> tuple[Tensor, Tensor]:
    """PEFT-layout factors so that ``scaling * lora_B @ lora_A = U_r S_r V~_r^T`` (as PEFT CorDA).

    Returns ``(lora_A, lora_B)`` in float64: ``lora_A = sqrt(S_r/s) V~_r^T``, ``lora_B = U_r sqrt(S_r/s)``.
    """
    root = (components.S / scaling).sqrt()
    lora_A = root[:, None] * components.Vt_tilde
    lora_B = components.U * root[None, :]
    return lora_A, lora_B


def residual_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``W' = W - s * lora_B @ lora_A`` in float64, so that ``W' + s B A = W`` at init."""
    return weight.double() - scaling * (lora_B.double() @ lora_A.double())


@dataclass
class SubspaceInit:
    """The result for one layer: adapter factors (float64) and what the report needs."""

    lora_A: Tensor
    lora_B: Tensor
    kept_singular_values: Tensor  # the adapter's components
    frozen_singular_values: Tensor  # the components left in the residual
    damp: float


def subspace_init(
    weight: Tensor,
    covariance: Tensor,
    rank: int,
    scaling: float,
    selection: ComponentSelection = "kpa",
    damp: float = 0.01,
    tolerance: float = 0.05,
    device: Optional[torch.device] = None,
    damped: Optional[DampedCovariance] = None,
) -> SubspaceInit:
    """The whole section-1 pipeline for one layer: damp, SVD, select, factorise.

    Pass ``damped`` to reuse the damped covariance of layers that read the same input (q/k/v, gate/up).
    """
    m, n = weight.shape
    if rank >= min(m, n):
        raise ValueError(
            f"LoRA rank {rank} must be smaller than min(out, in) = {min(m, n)} of a {m}x{n} layer: "
            "lower the rank or exclude this module from target_modules."
        )
    device = device or weight.device
    if damped is None:
        damped = damp_covariance(covariance.to(device), damp=damp, tolerance=tolerance)
    full = preconditioned_svd(weight.to(device), damped)
    kept = select_components(full, rank, selection)
    lora_A, lora_B = adapter_from_components(kept, scaling)
    k = full.S.shape[0]
    frozen = full.S[: k - rank] if selection == "kpa" else full.S[rank:]
    return SubspaceInit(
        lora_A=lora_A, lora_B=lora_B, kept_singular_values=kept.S, frozen_singular_values=frozen, damp=full.damp
    )
