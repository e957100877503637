"""AsFT regulariser (SAFETY_METHODS.md section 2): pure tensor functions.

AsFT (Yang, Zhang et al., AAAI 2026; official code PKU-YuanGroup/AsFT) adds ``lambda * sum_l ||M_l B_l A_l||_F^2``
to the loss, ``M = I - C`` with SafeLoRA's ``C = V V^T / ||V||_F``. With ``Q = M^T M``:
``||M B A||^2 = tr((B^T Q B)(A A^T))``, ``d/dB = 2 lambda Q B (A A^T)``, ``d/dA = 2 lambda (B^T Q B) A``, all from
``r x r`` products. For a low-rank ``C = U diag(w) U^T`` (``U`` orthonormal), ``Q = I - 2C + C^2`` and
``Q X = X - U ((2w - w^2) * (U^T X))``; the ``orthonormal`` option uses ``w = 1`` (``M`` a true projection).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_asft_settings(regularization_weight: float, projector: str) -> None:
    """Raise a clear error for settings outside their domain.

    Args:
        regularization_weight: lambda, >= 0.
        projector: ``"faithful"`` or ``"orthonormal"``.
    """
    if not regularization_weight >= 0:
        raise ValueError(
            f"regularization_weight (lambda) must be >= 0 (paper 1; sweep 0.1, 1, 10), got {regularization_weight!r}."
        )
    if projector not in ("faithful", "orthonormal"):
        raise ValueError(
            f"projector must be 'faithful' (official C = V V^T / ||V||) or 'orthonormal', got {projector!r}."
        )


def apply_q(x: Tensor, basis: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``Q x`` with ``Q = (I - C)^T (I - C)``, ``C = U diag(w) U^T``, never forming a ``d_out x d_out`` matrix.

    Args:
        x: a ``d_out x r`` matrix.
        basis: ``U``, ``d_out x k`` with orthonormal columns.
        weights: ``w`` (``k``); None means ``w = 1`` (the orthonormal projector, ``Q = I - U U^T``).
    """
    u = basis.to(device=x.device, dtype=x.dtype)
    coefficient = u.T @ x
    if weights is None:
        return x - u @ coefficient
    w = weights.to(device=x.device, dtype=x.dtype)
    return x - u @ ((2 * w - w * w)[:, None] * coefficient)


def asft_value_and_grads(
    lora_A: Tensor, lora_B: Tensor, basis: Tensor, weights: Optional[Tensor], regularization_weight: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lambda ||M B A||_F^2, d/dA, d/dB)`` by ``r x r`` products.

    Args:
        lora_A: ``A``, ``r x d_in``.
        lora_B: ``B``, ``d_out x r``.
        basis: ``U`` of ``C = U diag(w) U^T``, ``d_out x k``.
        weights: ``w``; None for the orthonormal projector.
        regularization_weight: lambda.
    """
    q_b = apply_q(lora_B, basis, weights)
    b_q_b = lora_B.T @ q_b
    a_a = lora_A @ lora_A.T
    value = regularization_weight * (b_q_b * a_a).sum()  # tr(X Y) for symmetric X, Y
    grad_B = 2 * regularization_weight * (q_b @ a_a)
    grad_A = 2 * regularization_weight * (b_q_b @ lora_A)
    return value, grad_A, grad_B


def alignment_factors(
    basis: Tensor, singular_values: Tensor, norm: float, projector: str = "faithful"
) -> tuple[Tensor, Optional[Tensor]]:
    """``(U, w)`` of ``C`` from ``V``'s spectrum: faithful ``w = sigma^2 / ||V||_F``; orthonormal ``w = None``.

    Args:
        basis: orthonormal basis of ``V``'s column space.
        singular_values: ``V``'s singular values.
        norm: ``||V||_F``.
        projector: ``"faithful"`` or ``"orthonormal"``.
    """
    if projector == "orthonormal":
        return basis, None
    return basis, singular_values.pow(2) / norm if norm > 0 else singular_values * 0
