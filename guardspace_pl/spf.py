"""SPF gradient surgery (SAFETY_METHODS.md section 4): pure tensor functions.

SPF (arXiv 2601.10141) has no public code; this is a reconstruction from the abstract and reviews. Per trainable
matrix: the safety gradient ``G_s`` is truncated to its top-``k`` singular directions (``k`` by the cumulative
energy ratio, CER), and when the utility gradient ``G_u`` conflicts with it (``<G_u, G_s^(k)> < 0``) the two-sided
component ``U_k (U_k^T G_u V_k) V_k^T`` is removed from ``G_u``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

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
    if singular_values.numel() == 0:
        return 0
    return cer_ranks(singular_values.reshape(1, -1), cer, k_max)[0]


def cer_ranks(singular_values: Tensor, cer: float = 0.85, k_max: int = 10) -> list[int]:
    """:func:`cer_rank` of every row of an ``n x m`` batch of descending singular values, with one host sync.

    Args:
        singular_values: ``n x m``, each row in descending order.
        cer: the cumulative energy ratio to reach, in (0, 1].
        k_max: the largest rank returned.
    """
    energy = singular_values.double().pow(2)
    total = energy.sum(-1, keepdim=True)
    ratio = energy.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # Rounding can leave the last ratio a hair below 1: the full rank always qualifies.
    reached = (ratio < cer - 1e-12).sum(-1) + 1
    ranks = reached.clamp(max=min(k_max, singular_values.shape[-1])).masked_fill(total.squeeze(-1) <= 0, 0)
    return ranks.tolist()


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


@dataclass
class SubspaceGroup:
    """The safety subspaces of ``n`` matrices of one shape, zero-padded to one rank ``K`` so that one batched
    product gates them all: ``u`` is ``n x d_out x K``, ``s`` is ``n x K``, ``v`` is ``n x d_in x K``; matrix
    ``indices[i]`` keeps its first ``ranks[i]`` columns, the others are zero (and so add nothing to any product).

    Args:
        indices: the matrices' positions in the full list.
        ranks: each matrix's own rank ``k``.
        u: left singular vectors, zero-padded.
        s: singular values, zero-padded.
        v: right singular vectors, zero-padded.
    """

    indices: list[int]
    ranks: list[int]
    u: Tensor
    s: Tensor
    v: Tensor


@dataclass
class StackedSubspaces:
    """The safety subspaces of ``count`` matrices, in groups of one shape (see :class:`SubspaceGroup`).

    Args:
        count: how many matrices.
        groups: the same-shape groups; every index in ``range(count)`` is in exactly one.
    """

    count: int
    groups: list[SubspaceGroup]

    @classmethod
    def from_subspaces(cls, subspaces: Sequence[SafetySubspace]) -> "StackedSubspaces":
        """Group per-matrix subspaces by shape, dtype and device and pad them to their group's largest rank.

        Args:
            subspaces: one subspace per matrix.
        """
        by_key: dict[tuple, list[int]] = defaultdict(list)
        for i, sub in enumerate(subspaces):
            by_key[(sub.u.shape[0], sub.v.shape[0], sub.u.dtype, sub.u.device)].append(i)
        groups = []
        for indices in by_key.values():
            ranks = [subspaces[i].rank for i in indices]
            width = max(ranks)

            def padded(t: Tensor, k: int) -> Tensor:
                return torch.nn.functional.pad(t, (0, width - k))

            groups.append(SubspaceGroup(
                indices, ranks,
                torch.stack([padded(subspaces[i].u, k) for i, k in zip(indices, ranks)]),
                torch.stack([padded(subspaces[i].s, k) for i, k in zip(indices, ranks)]),
                torch.stack([padded(subspaces[i].v, k) for i, k in zip(indices, ranks)]),
            ))
        return cls(len(subspaces), groups)

    def unstack(self) -> list[SafetySubspace]:
        """One :class:`SafetySubspace` per matrix, in order, without the padding."""
        out: list[Optional[SafetySubspace]] = [None] * self.count
        for group in self.groups:
            for j, (i, k) in enumerate(zip(group.indices, group.ranks)):
                out[i] = SafetySubspace(
                    group.u[j, :, :k].contiguous(), group.s[j, :k].contiguous(), group.v[j, :, :k].contiguous()
                )
        return out  # type: ignore[return-value]

    def to(self, device: torch.device) -> "StackedSubspaces":
        """These subspaces on ``device`` (``self`` when they are there already).

        Args:
            device: the target device.
        """
        if all(g.u.device == torch.device(device) for g in self.groups):
            return self
        moved = [SubspaceGroup(g.indices, g.ranks, g.u.to(device), g.s.to(device), g.v.to(device)) for g in self.groups]
        return StackedSubspaces(self.count, moved)


def safety_subspace(grad: Tensor, cer: float = 0.85, k_max: int = 10, lowrank_above: int = 4096) -> SafetySubspace:
    """Truncated SVD of a safety gradient with the CER rank rule, in float32 or better.

    Args:
        grad: the safety gradient of one matrix, ``d_out x d_in``.
        cer: the cumulative energy ratio to reach, in (0, 1].
        k_max: the largest rank kept.
        lowrank_above: use ``torch.svd_lowrank`` (``q = k_max + 10``, 2 power iterations) when both sides exceed this.
    """
    return safety_subspaces([grad], cer, k_max, lowrank_above).unstack()[0]


def safety_subspaces(
    grads: Sequence[Tensor], cer: float = 0.85, k_max: int = 10, lowrank_above: int = 4096
) -> StackedSubspaces:
    """:func:`safety_subspace` of every matrix, computed in one batched decomposition per shape (a model's LoRA
    factors come in a handful of shapes, so a refresh costs a few batched calls instead of one call per matrix).

    Args:
        grads: the safety gradients, one per matrix.
        cer: the cumulative energy ratio to reach, in (0, 1].
        k_max: the largest rank kept.
        lowrank_above: matrices with both sides larger than this use ``torch.svd_lowrank`` one at a time.
    """
    by_key: dict[tuple, list[int]] = defaultdict(list)
    works = [g.float() if g.dtype in (torch.float16, torch.bfloat16) else g for g in grads]
    groups = []
    for i, work in enumerate(works):
        if min(work.shape) > lowrank_above:
            groups.append(_lowrank_group(i, work, cer, k_max))
        else:
            by_key[(tuple(work.shape), work.dtype, work.device)].append(i)
    for indices in by_key.values():
        groups.append(_exact_group(indices, torch.stack([works[i] for i in indices]), cer, k_max))
    return StackedSubspaces(len(grads), groups)


def _lowrank_group(index: int, work: Tensor, cer: float, k_max: int) -> SubspaceGroup:
    """One large matrix's subspace by randomised SVD (deterministic given the seed, so every rank computes the same
    subspace)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(work, q=min(k_max + 10, min(work.shape)), niter=2)
    torch.random.set_rng_state(generator_state)
    # The energy ratio needs the total energy, not only the top-q part.
    tail = (work.pow(2).sum() - s.pow(2).sum()).clamp_min(0)
    k = min(cer_rank(torch.cat([s, tail.sqrt().reshape(1)]), cer, k_max), s.numel())
    return SubspaceGroup([index], [k], u[None, :, :k], s[None, :k], v[None, :, :k])


def _exact_group(indices: list[int], work: Tensor, cer: float, k_max: int) -> SubspaceGroup:
    """The subspaces of ``n`` same-shape matrices (``work`` is ``n x a x b``), zero-padded to the largest rank.

    A thin matrix (a LoRA factor, ``r x n`` or ``m x r``) takes the float64 eigendecomposition of its ``r x r`` Gram
    matrix: one small ``eigh`` instead of an SVD, much cheaper on GPUs (cuSOLVER's SVD of a 128 x 11008 matrix takes
    milliseconds). Squaring loses only the smallest directions, which the CER rule (k <= k_max, high energy) never
    keeps. Other shapes take a batched SVD.
    """
    a, b = work.shape[-2:]
    thin = max(a, b) >= THIN_RATIO * min(a, b)
    if thin:
        wide = a <= b
        w = work.double()
        gram = w @ w.mT if wide else w.mT @ w
        eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
        s = eigenvalues.flip(-1).clamp_min(0).sqrt()
        short_all = vectors.flip(-1)
    else:
        u_all, s, vh = torch.linalg.svd(work, full_matrices=False)
    ranks = cer_ranks(s, cer, k_max)
    width = max(ranks)
    keep = torch.arange(width, device=s.device) < torch.tensor(ranks, device=s.device)[:, None]  # n x K
    s = s[:, :width] * keep
    if thin:
        short = short_all[..., :width] * keep[:, None, :]
        scale = s.clamp_min(torch.finfo(torch.float64).tiny)[:, None, :]
        long = (w.mT @ short if wide else w @ short) / scale
        u, v = (short, long) if wide else (long, short)
        dtype = work.dtype
        u, s, v = u.to(dtype), s.to(dtype), v.to(dtype)
    else:
        u = u_all[..., :width] * keep[:, None, :]
        v = vh.mT[..., :width] * keep[:, None, :]
    return SubspaceGroup(indices, ranks, u.contiguous(), s.contiguous(), v.contiguous())


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


@dataclass
class ConflictEdit:
    """What :func:`remove_conflicts` did, per matrix (tensors on the gradients' device, no host sync yet).

    Args:
        grads: the gradients after the edit (equal in value to the input where not ``conflicted``).
        gated: whether the matrix had a gradient and a non-empty subspace.
        conflicted: whether ``<G_u, G_s^(k)> < 0`` (and so the gradient was edited).
        cosine_before: the cosine of ``G_u`` and ``G_s^(k)`` before the edit (0 where not gated).
        cosine_after: the same cosine after the edit.
    """

    grads: list[Optional[Tensor]]
    gated: Tensor
    conflicted: Tensor
    cosine_before: Tensor
    cosine_after: Tensor


def remove_conflicts(grads: Sequence[Optional[Tensor]], subspaces: StackedSubspaces) -> ConflictEdit:
    """:func:`remove_conflict` on every matrix at once: per shape group, ``T = U^T G V`` is one batched product, the
    gate reads ``<G, U diag(S) V^T> = sum_i S_i T_ii``, and the conflicting gradients lose ``U T V^T``.

    Args:
        grads: the utility gradients, one per matrix of ``subspaces`` (``None`` for a matrix without one).
        subspaces: the cached safety subspaces, on the gradients' device.
    """
    if len(grads) != subspaces.count:
        raise ValueError(f"{len(grads)} gradients for {subspaces.count} safety subspaces.")
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    n = subspaces.count
    gated = torch.zeros(n, dtype=torch.bool, device=device)
    conflicted = torch.zeros(n, dtype=torch.bool, device=device)
    cosine_before = torch.zeros(n, dtype=torch.float64, device=device)
    cosine_after = torch.zeros(n, dtype=torch.float64, device=device)
    out = list(grads)
    for group in subspaces.groups:
        present = [j for j, i in enumerate(group.indices) if grads[i] is not None and group.ranks[j] > 0]
        if not present:
            continue
        u, s, v = group.u, group.s, group.v
        if len(present) < len(group.indices):
            rows = torch.tensor(present, device=u.device)
            u, s, v = u[rows], s[rows], v[rows]
        indices = [group.indices[j] for j in present]
        g = torch.stack([grads[i] if grads[i].dtype == u.dtype else grads[i].to(u.dtype) for i in indices])
        core = u.mT @ g @ v  # n x K x K
        inner = (core.diagonal(dim1=-2, dim2=-1) * s).sum(-1)
        conflict = inner < 0
        removed = core * conflict[:, None, None]  # zero for the matrices without a conflict
        edited = torch.baddbmm(g, u @ removed, v.mT, alpha=-1)
        # U and V have orthonormal columns, so the edit removes exactly the part of <G, U S V^T> it computed, and
        # ||G - U T V^T||^2 = ||G||^2 - ||T||^2: the cosine after the edit costs no second pass over the gradients.
        g_norm_sq = g.flatten(1).pow(2).sum(-1).double()
        after_norm = (g_norm_sq - removed.flatten(1).pow(2).sum(-1).double()).clamp_min(0).sqrt()
        inner_after = inner - (removed.diagonal(dim1=-2, dim2=-1) * s).sum(-1)
        s_norm = s.double().norm(dim=-1)
        where = torch.tensor(indices, device=device)
        gated[where] = True
        conflicted[where] = conflict.to(device)
        cosine_before[where] = _safe_ratio(inner.double(), g_norm_sq.sqrt() * s_norm).to(device)
        cosine_after[where] = _safe_ratio(inner_after.double(), after_norm * s_norm).to(device)
        for j, i in enumerate(indices):
            out[i] = edited[j] if grads[i].dtype == edited.dtype else edited[j].to(grads[i].dtype)
    return ConflictEdit(out, gated, conflicted, cosine_before, cosine_after)


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny), 0.0)


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine of two flattened matrices (0 when either is zero).

    Args:
        x: a matrix.
        y: a matrix of the same shape.
    """
    x, y = x.double().flatten(), y.double().flatten()
    denominator = x.norm() * y.norm()
    return float((x @ y) / denominator) if denominator > 0 else 0.0
