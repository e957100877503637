"""SPF gradient surgery (SAFETY_METHODS.md section 4): pure tensor functions.

SPF (arXiv 2601.10141) has no public code; this is a reconstruction from the abstract and reviews. Per trainable
matrix: the safety gradient ``G_s`` is truncated to its top-``k`` singular directions (``k`` by the cumulative
energy ratio, CER), and when the utility gradient ``G_u`` conflicts with it (``<G_u, G_s^(k)> < 0``) the two-sided
component ``U_k (U_k^T G_u V_k) V_k^T`` is removed from ``G_u``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def check_spf_settings(k_max: int, cer: float, refresh_every: int) -> None:
    """Raise a clear error for settings outside their domain.

    Args:
        k_max: the largest subspace rank (>= 1).
        cer: the cumulative energy ratio the rank must reach, in (0, 1].
        refresh_every: optimizer steps between subspace refreshes (>= 1).
    """
    if not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1 (the largest safety-subspace rank; paper 10), got {k_max!r}.")
    if not 0 < cer <= 1:
        raise ValueError(
            f"cer must be in (0, 1] (the fraction of safety-gradient energy kept; paper 0.85), got {cer!r}."
        )
    if not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(
            f"refresh_every must be an integer >= 1 (optimizer steps between refreshes), got {refresh_every!r}."
        )


#: A gradient whose long side is at least this many times its short side takes the Gram route (LoRA factors).
THIN_RATIO = 8


def cer_rank(singular_values: Tensor, cer: float = 0.85, k_max: int = 10) -> int:
    """``min(k_max, smallest k with sum_{i<=k} s_i^2 / sum_i s_i^2 >= cer)``; 0 for a zero matrix.

    Args:
        singular_values: singular values in descending order.
        cer: the cumulative energy ratio to reach, in (0, 1].
        k_max: the largest rank returned.
    """
    energy = singular_values.double().pow(2)
    total = energy.sum()
    if singular_values.numel() == 0 or total <= 0:
        return 0
    ratio = energy.cumsum(0) / total
    # Rounding can leave the last ratio a hair below 1: the full rank always qualifies.
    reached = int((ratio < cer - 1e-12).sum().item()) + 1
    return min(k_max, reached, singular_values.numel())


@dataclass
class SafetySubspace:
    """The top-``k`` singular triplets of one matrix's safety gradient: ``G_s^(k) = U diag(S) V^T``.

    Args:
        u: left singular vectors, ``d_out x k``.
        s: singular values, ``k``.
        v: right singular vectors, ``d_in x k``.
    """

    u: Tensor
    s: Tensor
    v: Tensor

    @property
    def rank(self) -> int:
        """``k``."""
        return self.s.numel()

    def to(self, device: torch.device) -> "SafetySubspace":
        """This subspace on ``device``.

        Args:
            device: the target device.
        """
        return SafetySubspace(self.u.to(device), self.s.to(device), self.v.to(device))


def safety_subspace(grad: Tensor, cer: float = 0.85, k_max: int = 10, lowrank_above: int = 4096) -> SafetySubspace:
    """Truncated SVD of a safety gradient with the CER rank rule, in float32 or better.

    Args:
        grad: the safety gradient of one matrix, ``d_out x d_in``.
        cer: the cumulative energy ratio to reach, in (0, 1].
        k_max: the largest rank kept.
        lowrank_above: use ``torch.svd_lowrank`` (``q = k_max + 10``, 2 power iterations) when both sides exceed this.
    """
    work = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    if min(work.shape) > lowrank_above:
        # Randomised SVD: deterministic given the seed, so every rank computes the same subspace.
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(work, q=min(k_max + 10, min(work.shape)), niter=2)
        torch.random.set_rng_state(generator_state)
        # The energy ratio needs the total energy, not only the top-q part.
        total = work.pow(2).sum()
        tail = (total - s.pow(2).sum()).clamp_min(0)
        padded = torch.cat([s, tail.sqrt().reshape(1)])
        k = min(cer_rank(padded, cer, k_max), s.numel())
    elif max(work.shape) >= THIN_RATIO * min(work.shape):
        return _thin_safety_subspace(work, cer, k_max)
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        v = vh.T
        k = cer_rank(s, cer, k_max)
    return SafetySubspace(u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous())


def _thin_safety_subspace(work: Tensor, cer: float, k_max: int) -> SafetySubspace:
    """The top singular triplets of a thin matrix (a LoRA factor, ``r x n`` or ``m x r``) from the float64
    eigendecomposition of its ``r x r`` Gram matrix: one small ``eigh`` instead of an SVD, much cheaper on GPUs
    (cuSOLVER's SVD of a 128 x 11008 matrix takes milliseconds). Squaring loses only the smallest directions,
    which the CER rule (k <= k_max, high energy) never keeps."""
    wide = work.shape[0] <= work.shape[1]
    w = work.double()
    gram = w @ w.T if wide else w.T @ w
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    s = eigenvalues.flip(0).clamp_min(0).sqrt()
    k = cer_rank(s, cer, k_max)
    short = vectors.flip(1)[:, :k]
    scale = s[:k].clamp_min(torch.finfo(torch.float64).tiny)
    long = (w.T @ short if wide else w @ short) / scale
    u, v = (short, long) if wide else (long, short)
    dtype = work.dtype
    return SafetySubspace(u.to(dtype).contiguous(), s[:k].to(dtype).contiguous(), v.to(dtype).contiguous())


def subspace_inner(grad: Tensor, subspace: SafetySubspace) -> Tensor:
    """``<G, U diag(S) V^T> = sum_i S_i u_i^T G v_i`` without forming the rank-``k`` matrix.

    Args:
        grad: a gradient, ``d_out x d_in``.
        subspace: the safety subspace of the same matrix.
    """
    g = grad.to(subspace.u.dtype)
    return ((subspace.u.T @ g @ subspace.v).diagonal() * subspace.s).sum()


def remove_conflict(grad: Tensor, subspace: SafetySubspace) -> tuple[Tensor, bool]:
    """SPF's edit: if ``<G_u, G_s^(k)> < 0``, ``G_u - U (U^T G_u V) V^T``; else ``G_u`` unchanged.

    Returns the (possibly) edited gradient in ``grad``'s dtype and whether it conflicted.

    Args:
        grad: the utility gradient ``G_u`` of one matrix.
        subspace: the cached safety subspace of that matrix.
    """
    if subspace.rank == 0:
        return grad, False
    if subspace_inner(grad, subspace).item() >= 0:
        return grad, False
    u, v = subspace.u, subspace.v
    g = grad.to(u.dtype)
    edited = g - u @ (u.T @ g @ v) @ v.T
    return edited.to(grad.dtype), True


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine of two flattened matrices (0 when either is zero).

    Args:
        x: a matrix.
        y: a matrix of the same shape.
    """
    x, y = x.double().flatten(), y.double().flatten()
    denominator = x.norm() * y.norm()
    return float((x @ y) / denominator) if denominator > 0 else 0.0
