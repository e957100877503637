"""SafeLoRA (Hsu et al., NeurIPS 2024): project the LoRA updates least aligned with safety onto the alignment subspace.

Per module ``l`` with alignment vector ``V`` (``guardspace_pl.safety_reference``) and trained factors ``A``, ``B``:

1. ``C = V V^T / ||V||_F`` (never formed densely: ``AlignmentVector.apply_alignment_matrix``).
2. ``cos_l = cos(C B A, B A)`` (LoRA scale omitted; the cosine ignores it), from ``r x r`` Gram matrices.
3. Select: ``number`` mode, the ``K`` smallest cosines (every module with ``cos <= `` the K-th smallest, ties
   included, as the official code); ``threshold`` mode, ``cos <= tau``. All cosines come from the UNPROJECTED
   weights, then each selected module is projected once (the PEFT port projects twice in ``number`` mode).
4. Project ``B <- C B`` (``A`` unchanged), or with the ``orthonormal`` choice ``B <- U U^T B``.
5. Report per module: cosine, projected or not, and ``Pdst = mean 1 / (1 + ||B_new - proj(B)||)``.

The math lives in the small functions below; :func:`apply_safelora` runs them over a model's LoRA layers (FSDP2-safe:
every rank computes on full tensors and writes its own shard).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from guardspace_pl.distributed import full_tensor
from guardspace_pl.lora import LoraTarget
from guardspace_pl.safety_reference import AlignmentVector, SafetyReference

SelectionMode = Literal["number", "threshold"]
Projector = Literal["faithful", "orthonormal"]
ComputeDtype = Literal["float32", "float64"]
_MODES = ("number", "threshold")
_PROJECTORS = ("faithful", "orthonormal")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_safelora_settings(
    mode: str, num_projected_modules: int, threshold: float, projector: str, dtype: str = "float32"
) -> None:
    """Reject bad SafeLoRA settings with an error that names the fix.

    Args:
        mode: ``"number"`` or ``"threshold"``.
        num_projected_modules: K, the number of modules to project in ``number`` mode (at least 1).
        threshold: tau, the cosine at or below which a module is projected in ``threshold`` mode, in [-1, 1].
        projector: ``"faithful"`` or ``"orthonormal"``.
        dtype: ``"float32"`` (official) or ``"float64"``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if (
        isinstance(num_projected_modules, bool)
        or not isinstance(num_projected_modules, int)
        or num_projected_modules < 1
    ):
        raise ValueError(f"num_projected_modules (K) must be a positive integer, got {num_projected_modules!r}.")
    if not isinstance(threshold, (int, float)) or not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold (tau) is a cosine similarity and must lie in [-1, 1], got {threshold!r}.")
    if projector not in _PROJECTORS:
        raise ValueError(f"projector must be one of {_PROJECTORS}, got {projector!r}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.")


# ---------------------------------------------------------------------------------------------- math
def lora_cosine(left_new: Tensor, left: Tensor, lora_A: Tensor) -> float:
    """``cos(X A, Y A)`` for ``X = left_new``, ``Y = left`` (both ``d_out x r``) from ``r x r`` Gram matrices.

    ``<X A, Y A> = sum((X^T Y) * (A A^T))``: no ``d_out x d_in`` product is formed. A zero product gives 0, as
    ``torch.nn.functional.cosine_similarity`` (the official code) does.

    Args:
        left_new: ``X``, e.g. ``C B``.
        left: ``Y``, e.g. ``B``.
        lora_A: ``A``, ``r x d_in``.
    """
    gram_a = lora_A @ lora_A.T
    inner = ((left_new.T @ left) * gram_a).sum()
    norm_new = ((left_new.T @ left_new) * gram_a).sum().clamp_min(0).sqrt()
    norm_old = ((left.T @ left) * gram_a).sum().clamp_min(0).sqrt()
    denominator = (norm_new * norm_old).item()
    return 0.0 if denominator == 0 else (inner / (norm_new * norm_old)).clamp(-1, 1).item()


def safelora_cosine(vector: AlignmentVector, lora_A: Tensor, lora_B: Tensor) -> float:
    """SafeLoRA's similarity ``cos(C B A, B A)`` with ``C = V V^T / ||V||_F``.

    Args:
        vector: the module's alignment vector ``V``.
        lora_A: ``A``, ``r x d_in``.
        lora_B: ``B``, ``d_out x r``.
    """
    return lora_cosine(vector.apply_alignment_matrix(lora_B), lora_B, lora_A)


def project_lora_B(vector: AlignmentVector, lora_B: Tensor, projector: Projector = "faithful") -> Tensor:
    """The projected ``B``: ``C B`` (``faithful``, the paper) or ``U U^T B`` (``orthonormal``, a choice).

    Args:
        vector: the module's alignment vector ``V``.
        lora_B: ``B``, ``d_out x r``.
        projector: ``"faithful"`` or ``"orthonormal"``.
    """
    if projector == "faithful":
        return vector.apply_alignment_matrix(lora_B)
    if projector == "orthonormal":
        return vector.apply_orthonormal_projector(lora_B)
    raise ValueError(f"projector must be one of {_PROJECTORS}, got {projector!r}.")


def select_modules(
    cosines: Mapping[str, float], mode: SelectionMode, num_projected_modules: int = 10, threshold: float = 0.5
) -> tuple[set[str], float]:
    """The modules to project and the cosine cut-off used: ``cos <= cut-off`` is projected.

    ``number``: the cut-off is the K-th smallest cosine (ties at it are projected too, as the official code).
    ``threshold``: the cut-off is tau.

    Args:
        cosines: module name -> cosine, computed from the unprojected weights.
        mode: ``"number"`` or ``"threshold"``.
        num_projected_modules: K for ``number`` mode; must not exceed the number of modules.
        threshold: tau for ``threshold`` mode, in [-1, 1].
    """
    check_safelora_settings(mode, num_projected_modules, threshold, "faithful")
    if mode == "number":
        if num_projected_modules > len(cosines):
            raise ValueError(
                f"num_projected_modules (K) = {num_projected_modules} but only {len(cosines)} module(s) have an "
                "alignment vector to project onto. Pass K <= that number, or use threshold mode."
            )
        cut = sorted(cosines.values())[num_projected_modules - 1]
    else:
        cut = float(threshold)
    return {name for name, cos in cosines.items() if cos <= cut}, cut


def pdst(distances: Sequence[float]) -> float:
    """Mean of ``1 / (1 + ||B_new - proj(B)||)`` over modules (1 = every module projected).

    Args:
        distances: per module ``||B_new - proj(B)||``.
    """
    return float(sum(1.0 / (1.0 + d) for d in distances) / len(distances)) if distances else float("nan")


def safelora_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    vectors: Mapping[str, AlignmentVector],
    mode: SelectionMode = "number",
    num_projected_modules: int = 10,
    threshold: float = 0.5,
    projector: Projector = "faithful",
    dtype: ComputeDtype = "float32",
) -> tuple[dict[str, Tensor], "SafeLoraReport"]:
    """SafeLoRA on plain tensors: the new ``B`` of every module and the report (nothing is modified in place).

    Args:
        factors: module name -> ``(lora_A, lora_B)``.
        vectors: module name -> alignment vector; modules without one are left unchanged and reported.
        mode: ``"number"`` (K lowest cosines) or ``"threshold"`` (cosine <= tau).
        num_projected_modules: K.
        threshold: tau.
        projector: ``"faithful"`` (``C = V V^T / ||V||_F``, the paper) or ``"orthonormal"`` (``U U^T``).
        dtype: the dtype of the computation (``float32`` as the official code).
    """
    check_safelora_settings(mode, num_projected_modules, threshold, projector, dtype)
    scores = [
        _score(name, vectors.get(name), lora_A, lora_B, projector, dtype) for name, (lora_A, lora_B) in factors.items()
    ]
    report = _select(scores, mode, num_projected_modules, threshold, projector)
    new_B = {
        s.name: s.projected_B.to(factors[s.name][1].dtype) if s.name in report.projected_names else factors[s.name][1]
        for s in scores
    }
    return new_B, report


# ------------------------------------------------------------------------------------------- report
@dataclass
class SafeLoraModule:
    """One module's outcome.

    Args:
        name: the module's name inside the Hugging Face model.
        cosine: ``cos(C B A, B A)`` from the unprojected weights; None when skipped.
        projected: whether ``B`` was projected.
        distance: ``||B_new - proj(B)||`` (0 when projected); None when skipped.
        skipped: why the module was left out of the selection (no alignment vector, V = 0); None otherwise.
    """

    name: str
    cosine: Optional[float]
    projected: bool = False
    distance: Optional[float] = None
    skipped: Optional[str] = None


@dataclass
class SafeLoraReport:
    """What SafeLoRA did to a model.

    Args:
        mode: ``"number"`` or ``"threshold"``.
        num_projected_modules: K.
        threshold: tau.
        projector: ``"faithful"`` or ``"orthonormal"``.
        cut_off: modules with cosine <= this were projected (the K-th smallest cosine in number mode, tau in
            threshold mode).
        pdst: ``mean 1 / (1 + ||B_new - proj(B)||)`` over the modules with an alignment vector (1 = all projected).
        modules: per module outcome, in model order.
        identity_projector: modules whose orthonormal projector is the identity (``V`` of full row rank, e.g. a
            dense base/aligned difference), so projecting leaves them unchanged.
    """

    mode: str
    num_projected_modules: int
    threshold: float
    projector: str
    cut_off: float
    pdst: float
    modules: list[SafeLoraModule] = field(default_factory=list)
    identity_projector: list[str] = field(default_factory=list)

    @property
    def projected_names(self) -> set[str]:
        return {m.name for m in self.modules if m.projected}

    @property
    def skipped_names(self) -> list[str]:
        return [m.name for m in self.modules if m.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_projected": len(self.projected_names), "num_skipped": len(self.skipped_names)}

    def summary(self) -> str:
        considered = len(self.modules) - len(self.skipped_names)
        rule = f"K={self.num_projected_modules}" if self.mode == "number" else f"tau={self.threshold}"
        text = (
            f"SafeLoRA ({self.mode} mode, {rule}, {self.projector} projector): projected {len(self.projected_names)} "
            f"of {considered} modules (cosine <= {self.cut_off:.5f}), Pdst {self.pdst:.4f}"
        )
        if self.skipped_names:
            text += (
                f"; skipped {len(self.skipped_names)} with no or a zero alignment vector "
                f"(e.g. {self.skipped_names[:2]})"
            )
        return text + "."


@dataclass
class _Score:
    name: str
    cosine: Optional[float]
    projected_B: Optional[Tensor]
    original_B: Optional[Tensor]
    skipped: Optional[str] = None
    identity: bool = False


def _score(
    name: str, vector: Optional[AlignmentVector], lora_A: Tensor, lora_B: Tensor, projector: str, dtype: str
) -> _Score:
    if vector is None:
        return _Score(name, None, None, None, "not covered by the safety reference")
    if vector.norm() == 0:
        return _Score(name, None, None, None, "alignment vector V = 0")
    if vector.shape != (lora_B.shape[0], lora_A.shape[1]):
        raise ValueError(
            f"{name}: alignment vector of shape {vector.shape} but LoRA factors for "
            f"{(lora_B.shape[0], lora_A.shape[1])}."
        )
    compute = _DTYPES[dtype]
    lora_A, lora_B = lora_A.detach().to(compute), lora_B.detach().to(compute)
    cosine = safelora_cosine(vector, lora_A, lora_B)
    identity = projector == "orthonormal" and vector.spectrum()[0].shape[1] == vector.shape[0]
    return _Score(name, cosine, project_lora_B(vector, lora_B, projector), lora_B, identity=identity)


def _select(
    scores: list[_Score], mode: str, num_projected_modules: int, threshold: float, projector: str
) -> SafeLoraReport:
    cosines = {s.name: s.cosine for s in scores if s.skipped is None}
    if not cosines:
        raise ValueError("No LoRA layer has a non-zero alignment vector: SafeLoRA has nothing to project onto.")
    chosen, cut = select_modules(cosines, mode, num_projected_modules, threshold)
    modules, distances = [], []
    for s in scores:
        if s.skipped is not None:
            modules.append(SafeLoraModule(s.name, None, skipped=s.skipped))
            continue
        final = s.projected_B if s.name in chosen else s.original_B
        distance = (final - s.projected_B).norm().item()
        distances.append(distance)
        modules.append(SafeLoraModule(s.name, s.cosine, s.name in chosen, distance))
    identity = [s.name for s in scores if s.identity and s.name in chosen]
    if identity:
        warnings.warn(
            f"The orthonormal projector is the identity for {len(identity)} selected module(s) (e.g. {identity[:3]}): "
            "their alignment vector has full row rank (typical of a dense base/aligned difference), so projecting "
            "leaves them unchanged. Use projector='faithful' or a low-rank reference (a safety patch).",
            stacklevel=3,
        )
    return SafeLoraReport(
        mode, num_projected_modules, float(threshold), projector, float(cut), pdst(distances), modules, identity
    )


# ---------------------------------------------------------------------------------------------- model
@torch.no_grad()
def apply_safelora(
    targets: Sequence[LoraTarget],
    reference: SafetyReference,
    mode: SelectionMode = "number",
    num_projected_modules: int = 10,
    threshold: float = 0.5,
    projector: Projector = "faithful",
    dtype: ComputeDtype = "float32",
) -> SafeLoraReport:
    """Apply SafeLoRA to a model's LoRA layers in place (``lora_B`` of the selected modules) and report.

    The reference is checked against every layer first (shapes, coverage), and K against the number of covered
    layers, before anything is read or written. Alignment vectors are read one module at a time; only the
    projected ``B`` of each module (``d_out x r``) is kept until the selection is known. Under FSDP2 every rank
    computes the same cosines from all-gathered factors and writes its own shard.

    Args:
        targets: the LoRA layers (``guardspace_pl.lora.find_lora_targets``).
        reference: the alignment vectors.
        mode: ``"number"`` (K lowest cosines) or ``"threshold"`` (cosine <= tau).
        num_projected_modules: K.
        threshold: tau.
        projector: ``"faithful"`` (paper) or ``"orthonormal"`` (choice).
        dtype: the dtype of the computation (``float32`` as the official code).
    """
    check_safelora_settings(mode, num_projected_modules, threshold, projector, dtype)
    covered = {id(t) for t in reference.check_targets(targets)}  # shapes and coverage, from metadata only
    if mode == "number" and num_projected_modules > len(covered):
        raise ValueError(
            f"num_projected_modules (K) = {num_projected_modules} but the safety reference covers only {len(covered)} "
            f"of the {len(targets)} LoRA layers. Pass K <= {len(covered)}, or use threshold mode."
        )
    by_name: dict[str, LoraTarget] = {}
    scores = []
    for target in targets:
        by_name[target.hf_name] = target
        # A checkpoint reference reads this module's V now; it is dropped before the next one is read.
        vector = reference.vector(target.hf_name) if id(target) in covered else None
        lora_A, lora_B = full_tensor(target.lora_A), full_tensor(target.lora_B)
        scores.append(_score(target.hf_name, vector, lora_A, lora_B, projector, dtype))
        del vector
    report = _select(scores, mode, num_projected_modules, threshold, projector)
    for s in scores:
        if s.name in report.projected_names:
            target = by_name[s.name]
            target.write(lora_B=s.projected_B.to(dtype=target.lora_B.dtype))
    return report
