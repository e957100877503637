import pytest
import torch

from guardspace_pl.decomposition import sample_covariance
from guardspace_pl.null_space import NullSpaceProjector, null_space_mask, null_space_projector


def low_rank_covariance(n: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, n, generator=g, dtype=torch.float64)
    return x.T @ x, x


def test_projector_annihilates_calibration_span_and_is_an_orthogonal_projector():
    cov, x = low_rank_covariance(16, 5)
    projector = null_space_projector(cov, dtype=torch.float64)
    assert projector.null_dim == 11
    p = projector.dense()
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    assert (x @ p).abs().max() < 1e-10  # activations in the span are sent to zero
    g = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(projector.project(g), g @ p)


@pytest.mark.parametrize("rank, complement", [(3, True), (13, False)])
def test_the_smaller_basis_is_stored(rank, complement):
    cov, _ = low_rank_covariance(16, rank)
    projector = null_space_projector(cov)
    assert projector.complement is complement
    assert projector.basis.shape[1] == min(projector.null_dim, 16 - projector.null_dim)
    torch.testing.assert_close(
        projector.basis.T.double() @ projector.basis.double(),
        torch.eye(projector.basis.shape[1], dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )


def test_full_rank_covariance_gives_an_empty_null_space_and_zero_projection():
    cov = sample_covariance(torch.randn(100, 8))
    projector = null_space_projector(cov)
    assert projector.is_zero
    assert torch.count_nonzero(projector.project(torch.randn(2, 8))) == 0


def test_relative_threshold_follows_the_paper_rule():
    eig = torch.tensor([1e-12, 1e-7, 5e-6, 1.0], dtype=torch.float64)
    assert null_space_mask(eig, 1e-6).tolist() == [True, True, False, False]
    assert null_space_mask(eig, 1e-6, absolute_floor=1e-6).tolist() == [True, True, False, False]
    assert null_space_mask(eig, 1e-9, absolute_floor=1e-8).tolist() == [True, False, False, False]


def test_energy_mode_keeps_a_fraction_of_the_energy():
    eig = torch.tensor([0.01, 0.02, 0.97], dtype=torch.float64)
    assert null_space_mask(eig, 0.05, mode="energy").tolist() == [True, True, False]
    assert null_space_mask(eig, 0.015, mode="energy").tolist() == [True, False, False]
    with pytest.raises(ValueError, match="energy fraction"):
        null_space_mask(eig, 1.5, mode="energy")


def test_state_dict_round_trip():
    cov, _ = low_rank_covariance(10, 4)
    projector = null_space_projector(cov)
    again = NullSpaceProjector.from_state_dict(projector.state_dict())
    g = torch.randn(2, 10)
    torch.testing.assert_close(again.project(g), projector.project(g))
