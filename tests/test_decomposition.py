import pytest
import torch

from guardspace_pl.decomposition import (
    adapter_from_components,
    damp_covariance,
    normalize_sample,
    preconditioned_svd,
    residual_weight,
    sample_covariance,
    select_components,
    subspace_init,
)


def random_covariance(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    return sample_covariance(x) / 1.0


def test_normalisations_match_their_definitions():
    x = torch.tensor([[-4.0, 1.0], [2.0, -1.0]])
    assert torch.equal(normalize_sample(x, "max"), x / 2.0)  # |max X| as the official code
    assert torch.equal(normalize_sample(x, "max_abs"), x / 4.0)
    assert torch.equal(normalize_sample(x, "none"), x)
    with pytest.raises(ValueError, match="Unknown sample normalization"):
        normalize_sample(x, "l2")


def test_non_finite_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="Non-finite activation"):
        sample_covariance(torch.tensor([[1.0, float("nan")]]))


def test_damping_doubles_until_inverse_is_accurate():
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    c = q @ torch.diag(torch.logspace(0, -30, 32, dtype=torch.float64)) @ q.T  # numerically singular
    damped = damp_covariance(c, damp=1e-20)
    assert damped.damp > 1e-20
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.linalg.matrix_norm(damped.matrix @ damped.inverse - eye) < 0.05
    assert damped.matrix.dtype == torch.float64


def test_zero_covariance_is_an_error():
    with pytest.raises(ValueError, match="Covariance is zero"):
        damp_covariance(torch.zeros(4, 4))


def test_preconditioned_svd_reconstructs_weight_exactly():
    w = torch.randn(24, 16, dtype=torch.float64)
    damped = damp_covariance(random_covariance(16, 40))
    svd = preconditioned_svd(w, damped)
    assert torch.all(svd.S[:-1] >= svd.S[1:])
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vt_tilde, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("selection", ["kpa", "ipa"])
def test_selection_and_adapter_factorisation(selection):
    w = torch.randn(20, 12, dtype=torch.float64)
    svd = preconditioned_svd(w, damp_covariance(random_covariance(12, 30)))
    kept = select_components(svd, 3, selection)
    expected = svd.S[-3:] if selection == "kpa" else svd.S[:3]
    assert torch.equal(kept.S, expected)
    scaling = 2.0
    a, b = adapter_from_components(kept, scaling)
    assert a.shape == (3, 12) and b.shape == (20, 3)
    torch.testing.assert_close(scaling * b @ a, kept.U @ torch.diag(kept.S) @ kept.Vt_tilde)
    residual = residual_weight(w, a, b, scaling)
    torch.testing.assert_close(residual + scaling * b @ a, w)


def test_kpa_keeps_the_smallest_components_and_reports_the_frozen_ones():
    w = torch.randn(16, 16)
    result = subspace_init(w, random_covariance(16, 64), rank=4, scaling=0.5)
    assert result.kept_singular_values.max() <= result.frozen_singular_values.min()
    assert result.frozen_singular_values.numel() == 12


def test_rank_not_below_layer_size_is_an_error():
    with pytest.raises(ValueError, match="must be smaller than min"):
        subspace_init(torch.randn(8, 6), random_covariance(6, 10), rank=6, scaling=1.0)


def test_covariance_from_another_layer_is_an_error():
    with pytest.raises(ValueError, match="different layer"):
        preconditioned_svd(torch.randn(4, 6), damp_covariance(random_covariance(5, 10)))
