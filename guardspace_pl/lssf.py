"""LSSF, Low-Rank Safety Subspace Fusion (Zhou et al., ACL 2025): fold a safety vector, projected onto each layer's
safety subspace, back into an already fine-tuned model. Post hoc and training-free. Design spec: SAFETY_METHODS.md,
section 3 (confidence Medium: no official code exists; this is a reconstruction).

Per adapted linear layer ``l`` (attention and MLP only):

1. Anchor activations (paper): the aligned model runs N harmful prompts, each followed by the refusal that model
   itself generates (greedy); ``X_l`` are the layer's inputs over prompt + response tokens, ``X^ = X / sqrt(n)``
   (choice). The library's covariance collection gives ``C = X^ X^^T`` (``normalization="none"``).
2. SVD of ``W_safe X^`` (paper), computed from ``C`` on the smaller side: the eigendecomposition of ``W C W^T``
   (``d_out <= d_in``) or the SVD of ``W L`` with ``C = L L^T`` (``d_out > d_in``): ``U``, ``sigma``.
3. Safety singular value entropy (paper): ``p_i = sigma_i^2 / sum sigma_j^2``, ``H(rho) = -sum_{i<=rho} p_i log p_i``;
   ``r_l`` = the smallest ``rho`` with ``H(rho) / H(full) >= eta`` (choice ``eta = 0.9``).
4. Weighted projector (paper): ``P' = U_r diag(a) U_r^T``,
   ``a_i = 1 + (a_1 - 1)(sigma_i - sigma_r)/(sigma_1 - sigma_r)`` (choice ``a_1 = 1``: the plain projector).
5. Fusion (paper): ``W_final = W_ft + alpha P' delta_safe`` (choice ``alpha = 1``). ``alpha P' delta`` is always kept
   as two factors ``left @ right`` of inner size ``min(r_l, rank(delta))``; in a LoRA model it is folded into the
   frozen base weight (FSDP2-safe through ``LoraTarget.write``).

``delta_safe`` comes from a ``SafetyReference``: by default a safety patch (``s B A``, factored); the paper's
``theta_safe - theta_unsafe`` is ``SafetyReference.from_checkpoints(unsafe_dir, safe_dir)``.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from guardspace_pl.distributed import full_tensor
from guardspace_pl.lora import LoraTarget
from guardspace_pl.safety_reference import AlignmentVector, SafetyReference

#: LoRA layers LSSF acts on by default: attention and MLP linears (matched on the Hugging Face module name).
ATTENTION_MLP_PATTERN = r"\.(self_attn|attn|attention|mlp|feed_forward)\."


def check_lssf_settings(alpha: float, eta: float, a1: float = 1.0, module_pattern: str = ATTENTION_MLP_PATTERN) -> None:
    """Reject bad LSSF settings with an error that names the fix.

    Args:
        alpha: the fusion strength, ``>= 0`` (paper sweep {0.5, 1, 2}).
        eta: the entropy share that fixes each layer's rank, in ``(0, 1]``.
        a1: the weight of the top singular direction in the weighted projector, ``> 0`` (1: plain projector).
        module_pattern: a regular expression; LSSF acts on LoRA layers whose module name matches it.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(
            f"alpha (fusion strength) must be a finite number >= 0, got {alpha!r}; the paper uses 0.5-2."
        )
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < float(eta) <= 1.0:
        raise ValueError(
            f"eta (entropy share) must lie in (0, 1], got {eta!r}; the spec's default is 0.9 (sweep 0.8-0.95)."
        )
    if isinstance(a1, bool) or not isinstance(a1, (int, float)) or not math.isfinite(a1) or a1 <= 0:
        raise ValueError(
            f"a1 (weight of the top safety direction) must be a finite number > 0, got {a1!r}; "
            "1 is the plain projector."
        )
    try:
        re.compile(module_pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"module_pattern {module_pattern!r} is not a regular expression: {error}.") from None


# ---------------------------------------------------------------------------------------------- math
def entropy_rank(sigma: Tensor, eta: float) -> tuple[int, float]:
    """The safety-singular-value-entropy rank: the smallest ``rho`` with ``H(rho) / H(full) >= eta``.

    ``p_i = sigma_i^2 / sum sigma_j^2`` and ``H(rho) = -sum_{i<=rho} p_i log p_i`` (``0 log 0 = 0``). Returns
    ``(rho, H(rho) / H(full))``. A spectrum with one non-zero value (``H(full) = 0``) gives ``(1, 1.0)``; an all-zero
    one gives ``(0, 0.0)`` (nothing to project onto).

    Args:
        sigma: singular values, in decreasing order.
        eta: the entropy share, in ``(0, 1]``.
    """
    if not 0.0 < float(eta) <= 1.0:
        raise ValueError(f"eta must lie in (0, 1], got {eta!r}.")
    sigma = sigma.detach().double().flatten()
    if sigma.numel() > 1 and bool((sigma[1:] > sigma[:-1] * (1 + 1e-12)).any()):
        raise ValueError("entropy_rank expects singular values in decreasing order (as torch.linalg.svd returns).")
    energy = sigma.pow(2)
    total_energy = energy.sum()
    if sigma.numel() == 0 or total_energy <= 0:
        return 0, 0.0
    p = energy / total_energy
    cumulative = torch.cumsum(-torch.xlogy(p, p), 0)
    total = cumulative[-1].item()
    if total <= 0:
        return 1, 1.0
    ratios = cumulative / total
    # A hair of tolerance so that eta = 1 lands on the last non-zero value despite rounding.
    rho = int(torch.nonzero(ratios >= float(eta) - 1e-12)[0].item()) + 1
    return rho, ratios[rho - 1].item()


def projector_weights(sigma: Tensor, a1: float = 1.0) -> Tensor:
    """``a_i = 1 + (a_1 - 1)(sigma_i - sigma_r)/(sigma_1 - sigma_r)`` for the kept values ``sigma_1 >= ... >= sigma_r``.

    When ``sigma_1 = sigma_r`` (one kept value, or a flat spectrum) every ``a_i`` is 1 (a choice: the formula is 0/0).

    Args:
        sigma: the ``r`` kept singular values, in decreasing order.
        a1: the weight of the top direction (1: every weight is 1, the plain projector).
    """
    sigma = sigma.double()
    spread = (sigma[0] - sigma[-1]).item() if sigma.numel() else 0.0
    if sigma.numel() == 0 or spread <= 0:
        return torch.ones_like(sigma)
    return 1.0 + (a1 - 1.0) * (sigma - sigma[-1]) / spread


def covariance_root(covariance: Tensor) -> Tensor:
    """``L`` (``n x k``, float64) with ``L L^T = C`` for a PSD covariance: eigenvectors times ``sqrt(eigenvalues)``.

    Eigen-directions at rounding level (below ``n * eps(dtype of C) * lambda_max``) are dropped, so ``k <= n``.

    Args:
        covariance: ``C = X^ X^^T`` of a layer's inputs, ``n x n``.
    """
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"A covariance is a square matrix, got shape {tuple(covariance.shape)}.")
    if not torch.isfinite(covariance).all():
        raise ValueError(
            "The anchor covariance has NaN/inf entries: the anchor forward produced non-finite activations."
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    top = eigenvalues[-1].item() if eigenvalues.numel() else 0.0
    if top <= 0:
        return eigenvectors[:, :0]
    eps = torch.finfo(covariance.dtype).eps if covariance.dtype.is_floating_point else torch.finfo(torch.float64).eps
    keep = eigenvalues > covariance.shape[0] * eps * top
    return eigenvectors[:, keep] * eigenvalues[keep].sqrt()


def anchor_spectrum(
    weight: Tensor, covariance: Optional[Tensor] = None, root: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``(U, sigma)`` of ``W X^`` from ``C = X^ X^^T``, whichever side is smaller (same subspaces and
    values as the SVD).

    With ``root`` (``L L^T = C``, :func:`covariance_root`): the SVD of ``W L``. Otherwise, when ``d_out <= d_in``: the
    eigendecomposition of ``W C W^T`` (``d_out x d_out``; ``sigma = sqrt`` of its eigenvalues, negative rounding
    clipped to 0); when ``d_out > d_in``: the root of ``C`` first (``d_in x d_in``). Float64.

    Args:
        weight: ``W_safe``, ``d_out x d_in``.
        covariance: ``C``, ``d_in x d_in`` (needed unless ``root`` is given).
        root: ``L`` with ``L L^T = C``, ``d_in x k`` (e.g. cached for layers sharing one input).
    """
    weight = weight.detach().double()
    if root is None:
        if covariance is None:
            raise ValueError("anchor_spectrum needs the anchor covariance or its root.")
        if weight.shape[0] > weight.shape[1]:
            root = covariance_root(covariance)
        else:
            if not torch.isfinite(covariance).all():
                raise ValueError(
                    "The anchor covariance has NaN/inf entries: the anchor forward produced non-finite activations."
                )
            gram = weight @ covariance.to(device=weight.device, dtype=torch.float64) @ weight.T
            eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
            return eigenvectors.flip(1), eigenvalues.flip(0).clamp_min(0).sqrt()
    u, sigma, _ = torch.linalg.svd(weight @ root.to(device=weight.device, dtype=torch.float64), full_matrices=False)
    return u, sigma


@dataclass
class LssfFold:
    """One layer's fused term ``alpha P' delta = left @ right`` and how it was chosen.

    Args:
        left: ``d_out x q`` (float64).
        right: ``q x d_in`` (float64).
        rank: ``r_l``, the entropy rank of the anchor spectrum.
        entropy_ratio: ``H(r_l) / H(full)``.
        num_singular_values: how many singular values the anchor spectrum has.
        weights: the projector weights ``a_1 .. a_r``.
    """

    left: Tensor
    right: Tensor
    rank: int
    entropy_ratio: float
    num_singular_values: int
    weights: Tensor

    @property
    def inner_rank(self) -> int:
        """``q``: the rank bound of the fused term (``min(r_l, rank of delta)``)."""
        return self.left.shape[1]

    def dense(self) -> Tensor:
        """The ``d_out x d_in`` fused term (tests and small models)."""
        return self.left @ self.right

    def norm(self) -> float:
        """``||alpha P' delta||_F`` from ``q x q`` Gram matrices."""
        return ((self.left.T @ self.left) * (self.right @ self.right.T)).sum().clamp_min(0).sqrt().item()


def lssf_fold(
    weight: Tensor,
    covariance: Optional[Tensor],
    delta: AlignmentVector,
    alpha: float = 1.0,
    eta: float = 0.9,
    a1: float = 1.0,
    root: Optional[Tensor] = None,
) -> LssfFold:
    """``alpha P' delta`` for one layer, factored, with ``P' = U_r diag(a) U_r^T`` from the anchor spectrum.

    Args:
        weight: ``W_safe`` of the layer (the aligned model's weight), ``d_out x d_in``.
        covariance: ``C = X^ X^^T``, the anchor covariance of the layer's inputs (may be None when ``root`` is given).
        delta: the safety vector ``delta_safe`` (dense or factored).
        alpha: the fusion strength, ``>= 0``.
        eta: the entropy share fixing ``r_l``, in ``(0, 1]``.
        a1: the weight of the top direction in ``P'`` (1: plain projector).
        root: ``L`` with ``L L^T = C`` (:func:`covariance_root`), to reuse one factorisation across layers.
    """
    check_lssf_settings(alpha, eta, a1)
    if delta.shape != tuple(weight.shape):
        raise ValueError(f"The safety vector has shape {delta.shape} but the layer's weight {tuple(weight.shape)}.")
    u, sigma = anchor_spectrum(weight, covariance, root)
    rank, ratio = entropy_rank(sigma, eta)
    u_r = u[:, :rank]
    weights = projector_weights(sigma[:rank], a1)
    scaled = u_r * (alpha * weights)  # alpha U_r diag(a): d_out x r
    device = u_r.device
    if delta.is_factored:
        d_left = delta.left.to(device=device, dtype=torch.float64)
        d_right = delta.right.to(device=device, dtype=torch.float64)
        if rank < d_left.shape[1]:
            left, right = scaled, (u_r.T @ d_left) @ d_right
        else:
            left, right = scaled @ (u_r.T @ d_left), d_right
    else:
        left, right = scaled, u_r.T @ delta.left.to(device=device, dtype=torch.float64)
    return LssfFold(left, right, rank, ratio, sigma.numel(), weights)


def lssf_fused_weight(
    weight_ft: Tensor,
    weight_safe: Tensor,
    inputs: Tensor,
    delta: Tensor,
    alpha: float = 1.0,
    eta: float = 0.9,
    a1: float = 1.0,
) -> Tensor:
    """The paper's formula computed densely, straight from activations: ``W_ft + alpha P' delta`` (float64; tests).

    Args:
        weight_ft: the fine-tuned weight ``W_ft``.
        weight_safe: the aligned weight ``W_safe`` whose activation-weighted SVD defines ``P'``.
        inputs: the anchor inputs ``X`` of the layer, ``d_in x n`` (scaled here by ``1/sqrt(n)``).
        delta: the dense safety vector.
        alpha: the fusion strength.
        eta: the entropy share.
        a1: the weight of the top direction.
    """
    x_hat = inputs.double() / math.sqrt(inputs.shape[1])
    u, sigma, _ = torch.linalg.svd(weight_safe.double() @ x_hat, full_matrices=False)
    rank, _ = entropy_rank(sigma, eta)
    projector = u[:, :rank] @ torch.diag(projector_weights(sigma[:rank], a1)) @ u[:, :rank].T
    return weight_ft.double() + alpha * projector @ delta.double()


# ------------------------------------------------------------------------------------------- report
@dataclass
class LssfModule:
    """One layer's outcome.

    Args:
        name: the module's name inside the Hugging Face model.
        rank: ``r_l`` (None when skipped).
        entropy_ratio: ``H(r_l) / H(full)`` (None when skipped).
        num_singular_values: size of the anchor spectrum (None when skipped).
        fold_norm: ``||alpha P' delta||_F`` added to the weight (None when skipped).
        fold_rank: the inner size of the factored fused term (None when skipped).
        skipped: why the layer was left unchanged; None otherwise.
    """

    name: str
    rank: Optional[int] = None
    entropy_ratio: Optional[float] = None
    num_singular_values: Optional[int] = None
    fold_norm: Optional[float] = None
    fold_rank: Optional[int] = None
    skipped: Optional[str] = None


@dataclass
class LssfReport:
    """What LSSF did to a model.

    Args:
        alpha: the fusion strength.
        eta: the entropy share.
        a1: the weight of the top direction.
        num_anchor_prompts: how many harmful prompts (with their refusals) gave the anchor activations.
        modules: per layer outcome, in model order.
    """

    alpha: float
    eta: float
    a1: float
    num_anchor_prompts: int
    modules: list[LssfModule] = field(default_factory=list)

    @property
    def fused_names(self) -> list[str]:
        return [m.name for m in self.modules if m.skipped is None]

    @property
    def skipped_names(self) -> list[str]:
        return [m.name for m in self.modules if m.skipped is not None]

    def fold_ranks(self) -> dict[str, int]:
        """Module name -> inner size of its fused term (what an exported adapter must add to its rank)."""
        return {m.name: m.fold_rank for m in self.modules if m.skipped is None}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_fused": len(self.fused_names), "num_skipped": len(self.skipped_names)}

    def summary(self) -> str:
        fused = [m for m in self.modules if m.skipped is None]
        ranks = [m.rank for m in fused]
        text = (
            f"LSSF (alpha={self.alpha}, eta={self.eta}, a1={self.a1}, {self.num_anchor_prompts} anchor prompts): fused "
            f"{len(fused)} layers, rank r_l {min(ranks, default=0)}-{max(ranks, default=0)}, "
            f"total ||alpha P' delta||_F {math.sqrt(sum(m.fold_norm**2 for m in fused)):.4g}"
        )
        if self.skipped_names:
            text += f"; left {len(self.skipped_names)} unchanged (e.g. {self.skipped_names[:2]})"
        return text + "."


# ---------------------------------------------------------------------------------------------- model
@contextmanager
def adapters_disabled(targets: Sequence[LoraTarget]) -> Iterator[None]:
    """Run the model as it was before fine-tuning (LoRA layers bypassed), restoring flags and ``requires_grad`` after.

    Args:
        targets: the LoRA layers to bypass.
    """
    layers = list({id(t.layer): t.layer for t in targets}.values())
    states = [(layer, layer.disable_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


def anchor_token_ids(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], prompt_format: str = "chat_template"
) -> list[list[int]]:
    """Token ids of each prompt (formatted as the model is prompted) followed by its response.

    Args:
        tokenizer: the model's tokenizer.
        prompts: the harmful prompts.
        responses: the model's own responses, one per prompt.
        prompt_format: ``"chat_template"`` or ``"raw"``.
    """
    from guardspace_pl.prompts import format_prompt

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    rows = []
    for prompt, response in zip(prompts, responses):
        text = format_prompt(tokenizer, prompt, prompt_format)
        prompt_ids = tokenizer(text, add_special_tokens=prompt_format == "raw")["input_ids"]
        rows.append(list(prompt_ids) + list(tokenizer(response, add_special_tokens=False)["input_ids"]))
    return rows


@torch.no_grad()
def collect_anchor_covariances(
    model: nn.Module,
    targets: Sequence[LoraTarget],
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prompt_format: str = "chat_template",
) -> tuple[dict[str, Tensor], list[str]]:
    """The aligned model's anchor covariances ``C = X^ X^^T`` per LoRA layer, and its refusals.

    The aligned model is ``model`` with its LoRA layers bypassed (the model before fine-tuning): it answers each
    prompt greedily, then runs prompt + its own response, and the library's covariance collection gathers the
    layers' inputs (``normalization="none"``; layers reading one tensor, such as q/k/v, share one covariance).

    Args:
        model: the Hugging Face/PEFT causal LM holding ``targets``.
        targets: the LoRA layers.
        tokenizer: the model's tokenizer.
        prompts: the harmful anchor prompts (at least one).
        max_new_tokens: length limit of the generated refusals.
        batch_size: prompts per generation/forward batch.
        prompt_format: ``"chat_template"`` or ``"raw"``.
    """
    from guardspace_pl.calibration import collect_covariances
    from guardspace_pl.evaluation.generation import generate_responses

    if len(prompts) == 0:
        raise ValueError("LSSF needs at least one harmful anchor prompt; got an empty prompt set.")
    with adapters_disabled(targets):
        responses = generate_responses(
            model, tokenizer, list(prompts), max_new_tokens, batch_size, prompt_format, show_progress=False
        )
        token_ids = anchor_token_ids(tokenizer, prompts, responses, prompt_format)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        by_layer, _ = collect_covariances(
            model, targets, token_ids, normalization="none", batch_size=batch_size, pad_id=pad_id, progress=False,
            description="LSSF anchors",
        )
    return {name: group.covariance for name, group in by_layer.items()}, responses


@torch.no_grad()
def apply_lssf(
    targets: Sequence[LoraTarget],
    reference: SafetyReference,
    covariances: Mapping[str, Tensor],
    alpha: float = 1.0,
    eta: float = 0.9,
    a1: float = 1.0,
    module_pattern: str = ATTENTION_MLP_PATTERN,
    num_anchor_prompts: int = 0,
) -> LssfReport:
    """Fold ``alpha P' delta_safe`` into each matching LoRA layer's frozen base weight, in place, and report.

    ``W_safe`` is the frozen base weight (the model before fine-tuning); the fine-tuned model's function becomes
    ``W' + alpha P' delta + s B A``. Covariances are keyed by ``LoraTarget.name``; one covariance shared by several
    layers (q/k/v) is factored once. Under FSDP2 every rank computes from full tensors and writes its own shard.

    Args:
        targets: the LoRA layers (``guardspace_pl.lora.find_lora_targets``).
        reference: the safety vectors ``delta_safe`` per module.
        covariances: ``LoraTarget.name`` -> anchor covariance of the layer's inputs.
        alpha: the fusion strength, ``>= 0``.
        eta: the entropy share, in ``(0, 1]``.
        a1: the weight of the top direction (1: plain projector).
        module_pattern: LSSF acts on layers whose Hugging Face module name matches it (attention and MLP).
        num_anchor_prompts: for the report.
    """
    chosen_ids, covered = _lssf_layers(targets, reference, alpha, eta, a1, module_pattern)
    modules = _fuse_layers(targets, chosen_ids, covered, reference, covariances, alpha, eta, a1)
    return _finish_report(modules, alpha, eta, a1, num_anchor_prompts)


def _lssf_layers(
    targets: Sequence[LoraTarget], reference: SafetyReference, alpha: float, eta: float, a1: float, module_pattern: str
) -> tuple[set[int], set[int]]:
    """The ids of the layers LSSF acts on (``module_pattern``) and of those the reference covers; errors first."""
    check_lssf_settings(alpha, eta, a1, module_pattern)
    pattern = re.compile(module_pattern)
    chosen = [t for t in targets if pattern.search("." + t.hf_name + ".")]
    if not chosen:
        raise ValueError(
            f"No LoRA layer matches module_pattern {module_pattern!r} (e.g. {[t.hf_name for t in targets[:3]]}): "
            "LSSF acts on attention and MLP linears. Pass a pattern that matches your model's module names."
        )
    covered = {id(t) for t in reference.check_targets(chosen)}
    return {id(t) for t in chosen}, covered


def _finish_report(
    modules: list[LssfModule], alpha: float, eta: float, a1: float, num_anchor_prompts: int
) -> LssfReport:
    report = LssfReport(float(alpha), float(eta), float(a1), int(num_anchor_prompts), modules)
    if not report.fused_names:
        raise ValueError("LSSF fused no layer: every layer has a zero safety vector or a zero anchor spectrum.")
    if alpha == 0:
        warnings.warn("LSSF with alpha = 0 leaves the model unchanged.", stacklevel=3)
    return report


def _fuse_layers(
    targets: Sequence[LoraTarget],
    chosen_ids: set[int],
    covered: set[int],
    reference: SafetyReference,
    covariances: Mapping[str, Tensor],
    alpha: float,
    eta: float,
    a1: float,
) -> list[LssfModule]:
    """Fold the term into each chosen, covered layer of ``targets`` (in place); one outcome per layer."""
    lacking = [t.name for t in targets if id(t) in chosen_ids and id(t) in covered and t.name not in covariances]
    if lacking:  # checked before anything is written
        raise ValueError(f"No anchor covariance for {lacking[:3]}: the anchor forward did not reach these layers.")
    roots: dict[int, Tensor] = {}
    modules = []
    for target in targets:
        if id(target) not in chosen_ids:
            modules.append(LssfModule(target.hf_name, skipped="not an attention/MLP layer (module_pattern)"))
            continue
        if id(target) not in covered:
            modules.append(LssfModule(target.hf_name, skipped="not covered by the safety reference"))
            continue
        delta = reference.vector(target.hf_name)
        if delta.norm() == 0:
            modules.append(LssfModule(target.hf_name, skipped="safety vector delta = 0"))
            continue
        covariance = covariances[target.name]
        weight = full_tensor(target.base.weight).detach()
        root = None
        if weight.shape[0] > weight.shape[1]:  # wide outputs (gate/up): factor the shared input covariance once
            if id(covariance) not in roots:
                roots[id(covariance)] = covariance_root(covariance)
            root = roots[id(covariance)]
        fold = lssf_fold(weight, covariance, delta, alpha, eta, a1, root)
        if fold.rank == 0:
            modules.append(LssfModule(target.hf_name, skipped="zero anchor spectrum (the layer saw only zero inputs)"))
            continue
        target.write(weight=(weight.double() + fold.dense()).to(weight.dtype))
        modules.append(
            LssfModule(
                target.hf_name, fold.rank, fold.entropy_ratio, fold.num_singular_values, fold.norm(), fold.inner_rank
            )
        )
        del delta, fold
    return modules


def _decoder_block(target: LoraTarget) -> int:
    """The index of the decoder block holding ``target`` (``...layers.<i>...``); past every block otherwise."""
    match = re.search(r"\.layers\.(\d+)\.", "." + target.hf_name + ".")
    return int(match.group(1)) if match else sys.maxsize


@torch.no_grad()
def fuse_lssf_by_block(
    model: nn.Module,
    targets: Sequence[LoraTarget],
    reference: SafetyReference,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float = 1.0,
    eta: float = 0.9,
    a1: float = 1.0,
    module_pattern: str = ATTENTION_MLP_PATTERN,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prompt_format: str = "chat_template",
) -> tuple[LssfReport, list[str]]:
    """:func:`collect_anchor_covariances` + :func:`apply_lssf`, one decoder block at a time: the same result, with
    only one block's anchor covariances in memory (all of Llama-2-7B's at once take ~20 GiB, more than the model).

    The refusals are generated once; then, for the last block first, the anchor forward collects that block's
    covariances and LSSF folds its layers. Going backwards keeps the fusion exact: folding block ``l`` changes only
    what comes after it, so every earlier block's anchor inputs are still the aligned model's. The price is one
    anchor forward per block. Returns the report and the refusals.

    Args:
        model: the Hugging Face/PEFT causal LM holding ``targets``.
        targets: the LoRA layers.
        reference: the safety vectors ``delta_safe`` per module.
        tokenizer: the model's tokenizer.
        prompts: the harmful anchor prompts (at least one).
        alpha: the fusion strength, ``>= 0``.
        eta: the entropy share, in ``(0, 1]``.
        a1: the weight of the top direction (1: plain projector).
        module_pattern: LSSF acts on layers whose Hugging Face module name matches it (attention and MLP).
        max_new_tokens: length limit of the generated refusals.
        batch_size: prompts per generation/forward batch.
        prompt_format: ``"chat_template"`` or ``"raw"``.
    """
    from guardspace_pl.calibration import collect_covariances
    from guardspace_pl.evaluation.generation import generate_responses

    chosen_ids, covered = _lssf_layers(targets, reference, alpha, eta, a1, module_pattern)
    if len(prompts) == 0:
        raise ValueError("LSSF needs at least one harmful anchor prompt; got an empty prompt set.")
    blocks: dict[int, list[LoraTarget]] = {}
    for target in targets:
        blocks.setdefault(_decoder_block(target), []).append(target)
    outcomes: dict[int, LssfModule] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with adapters_disabled(targets):
        responses = generate_responses(
            model, tokenizer, list(prompts), max_new_tokens, batch_size, prompt_format, show_progress=False
        )
        token_ids = anchor_token_ids(tokenizer, prompts, responses, prompt_format)
        for block in sorted(blocks, reverse=True):
            group = [t for t in blocks[block] if id(t) in chosen_ids and id(t) in covered]
            covariances: dict[str, Tensor] = {}
            if group:
                by_layer, _ = collect_covariances(
                    model, group, token_ids, normalization="none", batch_size=batch_size, pad_id=pad_id, progress=False,
                    description=f"LSSF anchors, block {block}",
                )
                covariances = {name: g.covariance for name, g in by_layer.items()}
            fused = _fuse_layers(blocks[block], chosen_ids, covered, reference, covariances, alpha, eta, a1)
            for target, outcome in zip(blocks[block], fused):
                outcomes[id(target)] = outcome
            del covariances
    modules = [outcomes[id(t)] for t in targets]
    return _finish_report(modules, alpha, eta, a1, len(prompts)), responses
