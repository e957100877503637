import pytest
import torch

from guardspace_pl.spf import (
    cer_rank,
    check_spf_settings,
    remove_conflict,
    safety_subspace,
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
