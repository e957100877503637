"""Harmful-resistant null-space projectors (GuardSpace section 2), as pure tensor functions.

A projector ``P`` (``n x n``) onto the null space of a calibration covariance is never stored
densely. It is kept as whichever orthonormal basis is smaller: the null basis ``Q`` (``P = Q Q^T``)
or its complement ``U`` (``P = I - U U^T``), so ``G P`` costs ``2 r n k`` for ``k = min(dim, n - dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

ThresholdMode = Literal["relative", "energy"]


@dataclass
class NullSpaceProjector:
    """``P`` onto a subspace of dimension ``null_dim`` of ``R^n``, stored as a low-rank basis.

    ``complement=False``: ``basis`` spans range(P) and ``P = B B^T``.
    ``complement=True``: ``basis`` spans the orthogonal complement and ``P = I - B B^T``.
    """

    basis: Tensor  # n x k, orthonormal columns
    complement: bool
    null_dim: int

    @property
    def in_features(self) -> int:
        return self.basis.shape[0]

    @property
    def is_zero(self) -> bool:
        """An empty null space: the adapter's ``lora_A`` cannot move at all."""
        return self.null_dim == 0

    def project(self, g: Tensor) -> Tensor:
        """``G P`` for ``G`` of shape ``(..., n)``: row-wise projection onto the null space."""
        basis = self.basis.to(device=g.device, dtype=g.dtype)
        along = (g @ basis) @ basis.T
        return g - along if self.complement else along

    def dense(self) -> Tensor:
        """The dense ``n x n`` matrix (tests and the official-design baseline only)."""
        return self.project(torch.eye(self.in_features, dtype=self.basis.dtype, device=self.basis.device))

    def to(self, *args, **kwargs) -> "NullSpaceProjector":
        return NullSpaceProjector(self.basis.to(*args, **kwargs), self.complement, self.null_dim)

    def state_dict(self) -> dict:
        return {"basis": self.basis, "complement": self.complement, "null_dim": self.null_dim}

    @classmethod
    def from_state_dict(cls, state: dict) -> "NullSpaceProjector":
        return cls(state["basis"], bool(state["complement"]), int(state["null_dim"]))


def null_space_mask(
    eigenvalues: Tensor,
    threshold: float = 1e-6,
    mode: ThresholdMode = "relative",
    absolute_floor: float = 1e-8,
) -> Tensor:
    """Boolean mask of eigen-directions that count as the null space.

    ``relative`` (paper): ``lambda_j <= max(absolute_floor, threshold * max|lambda|)``.
    ``energy``: the smallest eigenvalues whose sum is at most ``threshold`` of the total energy.
    """
    if mode == "relative":
        cutoff = max(absolute_floor, threshold * eigenvalues.abs().max().item())
        return eigenvalues <= cutoff
    if mode == "energy":
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"An energy fraction must lie in [0, 1), got {threshold}.")
        values = eigenvalues.clamp_min(0)
        order = torch.argsort(values)
        cumulative = torch.cumsum(values[order], 0)
        keep_sorted = cumulative <= threshold * values.sum()
        mask = torch.zeros_like(keep_sorted)
        mask[order] = keep_sorted
        return mask
    raise ValueError(f"Unknown threshold mode {mode!r}; use 'relative' or 'energy'.")


def null_space_projector(
    covariance: Tensor,
    threshold: float = 1e-6,
    mode: ThresholdMode = "relative",
    absolute_floor: float = 1e-8,
    dtype: Optional[torch.dtype] = torch.float32,
) -> NullSpaceProjector:
    """Symmetrise, ``eigh``, pick the null directions, re-orthonormalise (QR), keep the smaller basis."""
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"Covariance must be square, got shape {tuple(covariance.shape)}.")
    if not torch.isfinite(covariance).all():
        raise ValueError("Covariance has non-finite entries; the calibration forward pass produced NaN/inf.")
    c = covariance.double()
    c = (c + c.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(c)
    mask = null_space_mask(eigenvalues, threshold, mode, absolute_floor)
    n = c.shape[0]
    null_dim = int(mask.sum())
    # Store the thinner of the two bases; QR restores exact orthonormality lost to float error.
    complement = null_dim > n - null_dim
    columns = eigenvectors[:, ~mask] if complement else eigenvectors[:, mask]
    if columns.shape[1] > 0:
        columns, _ = torch.linalg.qr(columns)
    return NullSpaceProjector(
        basis=columns.to(dtype or columns.dtype).contiguous(), complement=complement, null_dim=null_dim
    )


def merge_residual_correction(lora_A: Tensor, projected_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s * B (A - A P)``: what the frozen weight must gain so that ``W' + s B (A P)`` is unchanged."""
    return scaling * (lora_B.double() @ (lora_A.double() - projected_A.double()))
