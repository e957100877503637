import pytest
import torch

from guardspace_pl.spf import (
    StackedSubspaces,
    cer_rank,
    cer_ranks,
    check_spf_settings,
    cosine,
    remove_conflict,
    remove_conflicts,
    safety_subspace,
    safety_subspaces,
    subspace_inner,
)


def test_cer_rank_rule():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert cer_rank(s, 0.6) == 1
    assert cer_rank(s, 0.85) == 2
    assert cer_rank(s, 0.95) == 3
    assert cer_rank(s, 1.0) == 4
    assert cer_rank(s, 1.0, k_max=2) == 2
    assert cer_rank(torch.zeros(3), 0.85) == 0


@pytest.mark.parametrize("shape", [(16, 8), (5, 30), (64, 48)])
def test_after_the_edit_no_matrix_conflicts(shape):
    g = torch.Generator().manual_seed(shape[0])
    for trial in range(10):
        safety = torch.randn(*shape, generator=g) * torch.linspace(3, 0.1, shape[1])
        utility = -safety + 0.3 * torch.randn(*shape, generator=g)  # strongly conflicting
        subspace = safety_subspace(safety, 0.85, 10)
        assert subspace_inner(utility, subspace) < 0
        edited, conflicted = remove_conflict(utility, subspace)
        assert conflicted
        assert subspace_inner(edited, subspace) >= -1e-5 * utility.norm() * safety.norm()
        # the removed part lies in the subspace: U^T edited V == 0
        assert (subspace.u.T @ edited @ subspace.v).abs().max() < 1e-4


def test_no_edit_without_conflict():
    g = torch.Generator().manual_seed(3)
    safety = torch.randn(12, 6, generator=g)
    utility = safety + 0.1 * torch.randn(12, 6, generator=g)
    edited, conflicted = remove_conflict(utility, safety_subspace(safety))
    assert not conflicted and edited is utility


def test_lowrank_svd_matches_exact_subspace():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(300, 3, generator=g) @ torch.randn(3, 200, generator=g)
    safety = low + 1e-3 * torch.randn(300, 200, generator=g)
    exact = safety_subspace(safety, 0.85, 10)
    approx = safety_subspace(safety, 0.85, 10, lowrank_above=50)
    assert exact.rank == approx.rank
    torch.testing.assert_close(exact.s, approx.s, rtol=1e-3, atol=1e-3)
    projector_gap = exact.u @ exact.u.T - approx.u @ approx.u.T
    assert projector_gap.abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(8, 300), (300, 8)])  # LoRA A (r x n) and B (m x r)
def test_thin_gradients_take_the_gram_route_with_the_svds_result(shape):
    g = torch.Generator().manual_seed(7)
    safety = torch.randn(*shape, generator=g) * torch.linspace(4, 0.2, min(shape)).reshape(
        (-1, 1) if shape[0] < shape[1] else (1, -1)
    )
    gram = safety_subspace(safety, 0.9, 6)
    u, s, vh = torch.linalg.svd(safety.double(), full_matrices=False)
    k = gram.rank
    assert k == cer_rank(s, 0.9, 6) > 1
    assert gram.u.dtype == torch.float32 and gram.u.shape == (shape[0], k) and gram.v.shape == (shape[1], k)
    torch.testing.assert_close(gram.s.double(), s[:k], rtol=1e-5, atol=1e-6)
    # The same singular directions up to sign: U and V orthonormal, and U diag(S) V^T the same rank-k matrix.
    torch.testing.assert_close(gram.u.T @ gram.u, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(gram.v.T @ gram.v, torch.eye(k), atol=1e-5, rtol=0)
    rank_k = (u[:, :k] * s[:k]) @ vh[:k]
    torch.testing.assert_close((gram.u * gram.s) @ gram.v.T, rank_k.float(), atol=1e-4, rtol=1e-4)


def test_zero_safety_gradient_gives_empty_subspace():
    subspace = safety_subspace(torch.zeros(4, 3))
    assert subspace.rank == 0
    grad = torch.ones(4, 3)
    assert remove_conflict(grad, subspace)[0] is grad


@pytest.mark.parametrize("k_max,cer,refresh", [(0, 0.85, 1), (10, 0.0, 1), (10, 1.2, 1), (10, 0.85, 0)])
def test_bad_settings(k_max, cer, refresh):
    with pytest.raises(ValueError, match="k_max|cer|refresh_every"):
        check_spf_settings(k_max, cer, refresh)


def _mixed_gradients(seed: int) -> list[torch.Tensor]:
    """LoRA-like factors of three shapes (thin: the Gram route), square-ish matrices (the SVD route), a zero one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 64), (64, 8), (8, 64), (96, 8), (64, 8), (20, 30), (20, 30), (8, 64)]
    grads = [torch.randn(*shape, generator=g) * torch.rand(1, generator=g) for shape in shapes]
    grads[4] = torch.zeros(64, 8)
    return grads


def test_cer_ranks_is_cer_rank_per_row():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.1, 0.0, 0.0]])
    for cer in (0.5, 0.85, 1.0):
        assert cer_ranks(s, cer, k_max=3) == [cer_rank(row, cer, k_max=3) for row in s]


def test_batched_subspaces_equal_one_matrix_at_a_time():
    grads = _mixed_gradients(0)
    stacked = safety_subspaces(grads, cer=0.8, k_max=5)
    assert stacked.count == len(grads) and len(stacked.groups) == 4  # (8,64) (64,8) (96,8) (20,30)
    for grad, sub in zip(grads, stacked.unstack()):
        _, s, _ = torch.linalg.svd(grad.double(), full_matrices=False)
        assert sub.rank == cer_rank(s, 0.8, 5)
        torch.testing.assert_close(sub.s.double(), s[: sub.rank], rtol=1e-5, atol=1e-6)
        # U diag(S) V^T is the rank-k truncation, and the padding of the group never leaks into a matrix's own columns.
        u, s_full, vh = torch.linalg.svd(grad.double(), full_matrices=False)
        k = sub.rank
        truncated = (u[:, :k] * s_full[:k]) @ vh[:k]
        torch.testing.assert_close(((sub.u * sub.s) @ sub.v.T).double(), truncated, atol=1e-4, rtol=1e-4)
    assert stacked.unstack()[4].rank == 0


def test_stacking_round_trips():
    stacked = safety_subspaces(_mixed_gradients(1), cer=0.9, k_max=4)
    again = StackedSubspaces.from_subspaces(stacked.unstack())
    for a, b in zip(stacked.unstack(), again.unstack()):
        assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)


def test_batched_gate_equals_the_per_matrix_edit():
    safety = _mixed_gradients(2)
    subspaces = safety_subspaces(safety, cer=0.85, k_max=4)
    g = torch.Generator().manual_seed(3)
    # Half the utility gradients conflict (they point against the safety gradient), one matrix has none.
    utility = [(-s if i % 2 else s) + 0.5 * torch.randn(s.shape, generator=g) for i, s in enumerate(safety)]
    utility[6] = None
    edit = remove_conflicts(utility, subspaces)
    assert edit.conflicted.tolist() == [False, True, False, True, False, True, False, True]
    assert edit.gated.tolist() == [True, True, True, True, False, True, False, True]  # no subspace / no gradient
    for i, (grad, sub) in enumerate(zip(utility, subspaces.unstack())):
        if grad is None:
            assert edit.grads[i] is None
            continue
        expected, conflicted = remove_conflict(grad, sub)
        assert conflicted == bool(edit.conflicted[i])
        torch.testing.assert_close(edit.grads[i], expected, atol=1e-5, rtol=1e-5)
        if sub.rank:
            rank_k = (sub.u * sub.s) @ sub.v.T
            assert edit.cosine_before[i].item() == pytest.approx(cosine(grad, rank_k), abs=1e-5)
            assert edit.cosine_after[i].item() == pytest.approx(cosine(expected, rank_k), abs=1e-5)
            assert edit.cosine_after[i].item() >= -1e-6


def test_batched_gate_rejects_a_count_mismatch():
    subspaces = safety_subspaces(_mixed_gradients(4))
    with pytest.raises(ValueError, match="7 gradients for 8 safety subspaces"):
        remove_conflicts(_mixed_gradients(4)[:7], subspaces)
