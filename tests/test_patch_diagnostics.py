"""The safety patch paper's diagnostics as pure functions: subspace orthogonality and answer drift."""

from __future__ import annotations

import pytest
import torch

from guardspace_pl.patch_diagnostics import (
    changed_token_fraction,
    orthogonality_report,
    patch_right_singular_vectors,
    patch_weight_orthogonality,
    relative_change,
    subspace_overlap,
    summarise_orthogonality,
    weight_right_singular_vectors,
)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_factored_right_singular_vectors_span_the_dense_ones():
    g = torch.Generator().manual_seed(0)
    scaled_B, A = (
        torch.randn(40, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 30, generator=g, dtype=torch.float64),
    )
    factored = patch_right_singular_vectors(scaled_B, A)
    dense = torch.linalg.svd(scaled_B @ A).Vh[:6].T
    assert factored.shape == (30, 6)
    torch.testing.assert_close(factored.T @ factored, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(factored @ factored.T, dense @ dense.T, atol=1e-10, rtol=0)  # the same projector
    # The top three directions one by one (up to sign).
    for i in range(3):
        assert abs(float(factored[:, i] @ dense[:, i])) == pytest.approx(1.0, abs=1e-8)


def test_zero_directions_of_a_patch_are_dropped():
    scaled_B = torch.zeros(8, 4, dtype=torch.float64)
    scaled_B[:, :2] = torch.randn(8, 2, dtype=torch.float64)
    assert patch_right_singular_vectors(scaled_B, torch.randn(4, 10, dtype=torch.float64)).shape == (10, 2)


def test_overlap_of_known_subspaces():
    basis = orthonormal(20, 20, seed=1)
    a, b = basis[:, :4], basis[:, 4:8]
    assert subspace_overlap(a, b)["spectral"] == pytest.approx(0.0, abs=1e-12)  # orthogonal
    same = subspace_overlap(a, a)
    assert same["spectral"] == pytest.approx(1.0) and same["mean_squared"] == pytest.approx(1.0)
    half = torch.cat([basis[:, :2], basis[:, 10:12]], dim=1)  # shares 2 of 4 directions with a
    overlap = subspace_overlap(a, half)
    assert overlap["spectral"] == pytest.approx(1.0) and overlap["mean_squared"] == pytest.approx(0.5)
    assert overlap["random_baseline"] == pytest.approx(4 / 20)
    with pytest.raises(ValueError, match="same n"):
        subspace_overlap(a, basis[:10, :2])


def test_patch_in_the_weights_null_directions_is_orthogonal_and_one_along_them_is_not():
    n, m, r = 32, 24, 3
    basis = orthonormal(n, n, seed=2)
    top = basis[:, :r]  # the weight's top right singular directions
    weight = orthonormal(m, r, seed=3) @ torch.diag(torch.tensor([9.0, 8.0, 7.0], dtype=torch.float64)) @ top.T
    weight = weight + 1e-3 * torch.randn(m, n - r, dtype=torch.float64) @ basis[:, r:].T  # a small rest
    scaled_B = torch.randn(m, r, dtype=torch.float64)
    orthogonal = patch_weight_orthogonality(weight, scaled_B, basis[:, r : 2 * r].T)
    aligned = patch_weight_orthogonality(weight, scaled_B, top.T)
    assert orthogonal["spectral"] < 1e-2
    assert aligned["spectral"] == pytest.approx(1.0, abs=1e-4)  # the rest tilts by ~1e-4
    with pytest.raises(ValueError, match="does not fit"):
        patch_weight_orthogonality(weight[:, :10], scaled_B, top.T)


def test_randomized_weight_vectors_match_the_full_svd_on_a_large_matrix():
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(2100, 8, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2100, 8, generator=g, dtype=torch.float64))[0]
    weight = u @ torch.diag(torch.linspace(10, 3, 8, dtype=torch.float64)) @ v.T
    weight += 1e-4 * torch.randn(2100, 2100, generator=g, dtype=torch.float64)
    fast = weight_right_singular_vectors(weight, 4)  # above the full-SVD size: randomized
    assert subspace_overlap(fast, v[:, :4])["mean_squared"] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(fast, weight_right_singular_vectors(weight, 4))  # the same on every call


def test_report_and_summary():
    weights = {"a": torch.randn(6, 8), "b": torch.randn(6, 8)}
    factors = {name: (torch.randn(6, 2), torch.randn(2, 8)) for name in weights}
    report = orthogonality_report(weights, factors)
    summary = summarise_orthogonality(report)
    assert summary["modules"] == 2 and 0 <= summary["spectral_mean"] <= summary["spectral_max"] <= 1 + 1e-9
    with pytest.raises(KeyError, match="No frozen weight"):
        orthogonality_report({"a": weights["a"]}, factors)
    with pytest.raises(ValueError, match="empty"):
        summarise_orthogonality({})


def test_changed_token_fraction_counts_positions_and_prompts():
    before = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    after = [[1, 2, 3, 4], [5, 0, 7], [8, 9, 10, 11]]
    drift = changed_token_fraction(before, after, k=3)
    # pair 1: 0 of 3 changed; pair 2: 1 of 3; pair 3: one extra token within k (1 of 3)
    assert drift["tokens"] == pytest.approx(2 / 9) and drift["prompts"] == pytest.approx(2 / 3)
    assert changed_token_fraction(before, before, k=4)["tokens"] == 0.0
    with pytest.raises(ValueError, match="one pair per prompt"):
        changed_token_fraction(before, after[:2], k=3)
    with pytest.raises(ValueError, match="k must be positive"):
        changed_token_fraction(before, after, k=0)


def test_relative_change():
    assert relative_change(2.0, 2.04) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="undefined"):
        relative_change(0.0, 1.0)
