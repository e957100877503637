import pytest
import torch

from guardspace_pl.asft import alignment_factors, apply_q, asft_value_and_grads, check_asft_settings
from guardspace_pl.safety_reference import AlignmentVector


def reference_loss(lora_A, lora_B, c_dense, lam):
    m = torch.eye(c_dense.shape[0], dtype=c_dense.dtype) - c_dense
    return lam * (m @ lora_B @ lora_A).pow(2).sum()


def factors(vector: AlignmentVector, projector: str):
    u, sigma = vector.spectrum()
    return alignment_factors(u, sigma, vector.norm(), projector)


@pytest.mark.parametrize("shape", [(12, 7, 3, 2), (20, 9, 4, 4), (8, 8, 1, 1), (16, 5, 2, 6)])
@pytest.mark.parametrize("factored", [True, False])
def test_analytic_gradient_equals_autograd(shape, factored):
    d_out, d_in, r, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    left = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, d_in, generator=g, dtype=torch.float64)
    vector = AlignmentVector(left, right) if factored else AlignmentVector(left @ right)
    lora_A = torch.randn(r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(d_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    for projector in ("faithful", "orthonormal"):
        basis, weights = factors(vector, projector)
        if projector == "faithful":
            c = vector.alignment_matrix_dense()
        else:
            c = basis @ basis.T
        lam = 0.7
        expected = reference_loss(lora_A, lora_B, c, lam)
        grad_A, grad_B = torch.autograd.grad(expected, (lora_A, lora_B))
        value, analytic_A, analytic_B = asft_value_and_grads(lora_A.detach(), lora_B.detach(), basis, weights, lam)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(analytic_A, grad_A, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(analytic_B, grad_B, rtol=1e-10, atol=1e-10)


def test_zero_when_the_update_lies_along_v():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    vector = AlignmentVector(
        u @ torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    )
    basis, _ = factors(vector, "orthonormal")
    lora_B = basis @ torch.randn(basis.shape[1], 2, generator=g, dtype=torch.float64)  # columns in span(V)
    lora_A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    value, grad_A, grad_B = asft_value_and_grads(lora_A, lora_B, basis, None, 1.0)
    assert value.abs() < 1e-12 and grad_A.abs().max() < 1e-10 and grad_B.abs().max() < 1e-10
    # the faithful C is not a projector: along V it still penalises unless sigma^2 / ||V|| = 1
    faithful_value, _, _ = asft_value_and_grads(lora_A, lora_B, *factors(vector, "faithful"), 1.0)
    assert faithful_value > 1e-6


def test_orthonormal_option_is_a_true_projection():
    g = torch.Generator().manual_seed(1)
    vector = AlignmentVector(
        torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    )
    basis, weights = factors(vector, "orthonormal")
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    once = apply_q(x, basis, weights)
    torch.testing.assert_close(apply_q(once, basis, weights), once)  # Q = M is idempotent
    torch.testing.assert_close(basis.T @ once, torch.zeros(basis.shape[1], 4, dtype=torch.float64), atol=1e-12, rtol=0)
    faithful_once = apply_q(x, *factors(vector, "faithful"))
    assert (apply_q(faithful_once, *factors(vector, "faithful")) - faithful_once).abs().max() > 1e-6


@pytest.mark.parametrize("lam,projector", [(-0.1, "faithful"), (1.0, "dense")])
def test_bad_settings(lam, projector):
    with pytest.raises(ValueError, match="regularization_weight|projector"):
        check_asft_settings(lam, projector)
