"""The safety patch's diagnostics (arXiv 2510.09004; SAFETY_METHODS.md section 5), as pure functions of tensors.

1. **Orthogonality**, per adapted module: the top-r right singular vectors ``V_patch`` of the patch's update
   ``s B A`` against the top-r right singular vectors ``V_W`` of the frozen weight. ``||V_patch^T V_W||_2`` is the
   cosine of the smallest principal angle between the two input subspaces (0: orthogonal, 1: they share a
   direction); the paper reports it below 0.1 for LoRA patches and above 0.4 for full fine-tuning. Two random
   r-dimensional subspaces of R^n have a mean squared cosine of ``r / n``, reported beside it as a baseline.
2. **Answer drift**: the fraction of the first ``k`` answer tokens that change on held-out harmless prompts.
3. **Utility**: the relative change of the held-out GSM8K answer loss.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

#: Above this size the frozen weight's top-r right singular vectors come from a randomized SVD (exact to
#: rounding for the top few directions with a few power iterations), not a full SVD of a 4096 x 14336 matrix.
_FULL_SVD_MAX_DIM = 2048


@torch.no_grad()
def patch_right_singular_vectors(scaled_B: Tensor, A: Tensor, rank: Optional[int] = None) -> Tensor:
    """Orthonormal top right singular vectors (``n x k``) of the update ``scaled_B @ A``, from its factors only.

    ``A^T = Q R`` (thin QR), so ``scaled_B A = (scaled_B R^T) Q^T``; the SVD of the small ``m x r`` matrix
    ``scaled_B R^T = U S W^T`` gives the right singular vectors ``Q W``. Never forms the ``m x n`` update.

    Args:
        scaled_B: ``s B``, ``m x r``.
        A: ``r x n``.
        rank: how many vectors (default ``r``); directions with a zero singular value are dropped.
    """
    if scaled_B.ndim != 2 or A.ndim != 2 or scaled_B.shape[1] != A.shape[0]:
        raise ValueError(f"Expected factors B (m x r) and A (r x n), got {tuple(scaled_B.shape)} and {tuple(A.shape)}.")
    q, r = torch.linalg.qr(A.double().T)  # n x r, r x r
    _, s, wh = torch.linalg.svd(scaled_B.double() @ r.T, full_matrices=False)
    k = A.shape[0] if rank is None else min(rank, A.shape[0])
    keep = int((s[:k] > s.max().clamp_min(1e-300) * 1e-10).sum()) if s.numel() else 0
    return q @ wh[:keep].T


@torch.no_grad()
def weight_right_singular_vectors(weight: Tensor, rank: int) -> Tensor:
    """Orthonormal top-``rank`` right singular vectors (``n x rank``) of a frozen weight ``m x n``.

    Args:
        weight: the frozen weight.
        rank: how many vectors.
    """
    if weight.ndim != 2:
        raise ValueError(f"Expected a matrix, got shape {tuple(weight.shape)}.")
    rank = min(rank, *weight.shape)
    w = weight.double()
    if min(w.shape) <= _FULL_SVD_MAX_DIM:
        return torch.linalg.svd(w, full_matrices=False).Vh[:rank].T
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same vectors on every call
    try:
        _, _, v = torch.svd_lowrank(w, q=rank + 10, niter=6)
    finally:
        torch.random.set_rng_state(generator_state)
    return v[:, :rank]


def subspace_overlap(V_a: Tensor, V_b: Tensor) -> dict[str, float]:
    """How much two subspaces given by orthonormal columns share: spectral and mean-squared cosines.

    Returns ``spectral`` = ``||V_a^T V_b||_2`` (the largest cosine of a principal angle; the paper's number),
    ``mean_squared`` = ``||V_a^T V_b||_F^2 / min(k_a, k_b)`` and ``random_baseline`` = ``max(k_a, k_b) / n`` (the
    expected mean squared cosine of a random subspace).

    Args:
        V_a: ``n x k_a`` orthonormal columns.
        V_b: ``n x k_b`` orthonormal columns.
    """
    if V_a.ndim != 2 or V_b.ndim != 2 or V_a.shape[0] != V_b.shape[0]:
        raise ValueError(f"Expected two n x k matrices with the same n, got {tuple(V_a.shape)} and {tuple(V_b.shape)}.")
    n, k = V_a.shape[0], min(V_a.shape[1], V_b.shape[1])
    if k == 0:
        return {"spectral": 0.0, "mean_squared": 0.0, "random_baseline": 0.0}
    cross = V_a.double().T @ V_b.double()
    return {
        "spectral": float(torch.linalg.matrix_norm(cross, ord=2)),
        "mean_squared": float(cross.square().sum() / k),
        "random_baseline": max(V_a.shape[1], V_b.shape[1]) / n,
    }


def patch_weight_orthogonality(
    weight: Tensor, scaled_B: Tensor, A: Tensor, rank: Optional[int] = None
) -> dict[str, float]:
    """:func:`subspace_overlap` of the patch's top right singular subspace and the frozen weight's, same rank.

    Args:
        weight: the frozen weight ``W`` (``m x n``).
        scaled_B: the patch's ``s B`` (``m x r``).
        A: the patch's ``A`` (``r x n``).
        rank: the subspace dimension (default the patch's rank ``r``).
    """
    if weight.shape != (scaled_B.shape[0], A.shape[1]):
        raise ValueError(
            f"The patch ({scaled_B.shape[0]} x {A.shape[1]}) does not fit the weight {tuple(weight.shape)}."
        )
    V_patch = patch_right_singular_vectors(scaled_B, A, rank)
    V_weight = weight_right_singular_vectors(weight, V_patch.shape[1] or 1)
    return {**subspace_overlap(V_patch, V_weight), "rank": V_patch.shape[1]}


def orthogonality_report(
    weights: Mapping[str, Tensor], factors: Mapping[str, tuple[Tensor, Tensor]], rank: Optional[int] = None
) -> dict[str, dict[str, float]]:
    """:func:`patch_weight_orthogonality` for every module of the patch, by module name.

    Args:
        weights: module name -> frozen weight.
        factors: module name -> ``(s B, A)`` of the patch.
        rank: the subspace dimension (default each module's patch rank).
    """
    missing = sorted(set(factors) - set(weights))
    if missing:
        raise KeyError(
            f"No frozen weight for the patched modules {missing[:3]}; pass the base model's weights for them."
        )
    return {name: patch_weight_orthogonality(weights[name], b, a, rank) for name, (b, a) in factors.items()}


def summarise_orthogonality(report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean, median and max of the per-module spectral overlap, and the mean random baseline.

    Args:
        report: :func:`orthogonality_report`'s output.
    """
    if not report:
        raise ValueError("The orthogonality report is empty: the patch adapts no module.")
    spectral = torch.tensor([r["spectral"] for r in report.values()], dtype=torch.float64)
    return {
        "modules": len(report),
        "spectral_mean": float(spectral.mean()),
        "spectral_median": float(spectral.median()),
        "spectral_max": float(spectral.max()),
        "mean_squared_mean": float(sum(r["mean_squared"] for r in report.values()) / len(report)),
        "random_baseline_mean": float(sum(r["random_baseline"] for r in report.values()) / len(report)),
    }


def changed_token_fraction(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]], k: int) -> dict[str, float]:
    """How much of the first ``k`` answer tokens a change of model alters, over paired answers to the same prompts.

    Position ``t < k`` of a pair counts when either answer has a token there; it is changed when the tokens differ
    or only one answer has one (an answer that got shorter or longer). Returns ``tokens`` (changed / counted
    positions) and ``prompts`` (share of prompts with any changed position).

    Args:
        before: token ids of each answer before the change (e.g. the original model's).
        after: token ids of each answer after it (e.g. the patched model's), same prompts in the same order.
        k: how many leading answer tokens to compare.
    """
    if len(before) != len(after):
        raise ValueError(f"Got {len(before)} answers before and {len(after)} after; pass one pair per prompt.")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    if not before:
        raise ValueError("No answers to compare.")
    changed = counted = prompts_changed = 0
    for old, new in zip(before, after):
        old, new = list(old)[:k], list(new)[:k]
        span = max(len(old), len(new))
        diff = sum(1 for t in range(span) if t >= len(old) or t >= len(new) or old[t] != new[t])
        changed += diff
        counted += span
        prompts_changed += diff > 0
    return {
        "tokens": changed / counted if counted else 0.0,
        "prompts": prompts_changed / len(before),
        "k": k,
        "n": len(before),
    }


def relative_change(before: float, after: float) -> float:
    """``(after - before) / |before|``: e.g. +0.02 for a GSM8K answer loss 2 % above the original's.

    Args:
        before: the original model's value.
        after: the patched model's value.
    """
    if not (math.isfinite(before) and math.isfinite(after)):
        raise ValueError(f"Both values must be finite, got {before} and {after}.")
    if before == 0:
        raise ValueError("The original value is 0: a relative change is undefined.")
    return (after - before) / abs(before)


__all__ = [
    "changed_token_fraction",
    "orthogonality_report",
    "patch_right_singular_vectors",
    "patch_weight_orthogonality",
    "relative_change",
    "subspace_overlap",
    "summarise_orthogonality",
    "weight_right_singular_vectors",
]
