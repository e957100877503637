"""``SafetyGradientProjection``: SPF gradient surgery against a low-rank safety-gradient subspace (a reconstruction)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.datamodules import collate, tokenize_example
from guardspace_pl.datamodules.sources import Example
from guardspace_pl.distributed import full_tensor, write_full_
from guardspace_pl.losses import response_loss
from guardspace_pl.spf import (
    SafetySubspace,
    StackedSubspaces,
    check_spf_settings,
    remove_conflicts,
    safety_subspaces,
)

from .base import LoraCallback, find_causal_lm, loss_scale, resolve_tokenizer

SafetySample = Union[Sequence[str], Mapping[str, str]]


class SafetyGradientProjection(LoraCallback):
    r"""SPF (arXiv 2601.10141): remove the part of each update that conflicts with a low-rank safety-gradient subspace.

    **A reconstruction.** SPF has no public code and no paper body was available: this follows the abstract and
    reviews (SAFETY_METHODS.md section 4), and every step below is a choice exposed as an argument. In
    ``on_before_optimizer_step`` (gradients accumulated, unscaled, not yet clipped), every ``refresh_every``
    optimizer steps the safety loss ``L_s = -log p(refusal | harmful prompt)`` (response tokens only, chat template)
    is differentiated with ``torch.autograd.grad`` at the current weights (dropout off, the training autocast and,
    under ``16-mixed``, the GradScaler's current loss scale, divided out again;
    ``.grad`` untouched; FSDP2-sharded parameters take a backward into ``.grad`` with the utility gradients set
    aside and restored, and every rank edits its own rows of the gathered gradient). For each trainable 2-D
    parameter its gradient ``G_s`` is truncated to ``U_k diag(S_k) V_k^T``, ``k = min(k_max, smallest k with
    CER >= cer)``, and cached. Every step, a utility gradient with
    ``<G_u, G_s^(k)> < 0`` becomes ``G_u - U_k (U_k^T G_u V_k) V_k^T``. Works on LoRA factors and on full
    fine-tuning (``torch.svd_lowrank`` above ``lowrank_above``).

    Order of gradient edits: ``AsFTRegularizer`` (``on_after_backward``) -> this callback -> ``NullSpaceProjection``
    (its projection acts last, whatever the order of the callback list: at set-up this callback moves itself in
    ``trainer.callbacks`` before the first ``NullSpaceProjection``) -> gradient clipping -> optimizer step.

    Logs ``spf/conflicts`` (matrices edited), ``spf/cosine_before`` and ``spf/cosine_after`` (mean cosine of
    ``G_u`` and ``G_s^(k)`` over matrices) every step.

    Args:
        safety_samples: ``(harmful prompt, refusal)`` pairs or ``{"prompt": ..., "response": ...}`` dicts (default:
            the DataModule's ``safety_samples`` attribute).
        tokenizer: a tokenizer, or a name/path to load one (default: the DataModule's or LightningModule's).
        training_format: how the safety sample is formatted, ``"chat_template"`` (the spec) or ``"alpaca"``.
        max_length: safety sequences longer than this lose prompt tokens from the start.
        k_max: the largest safety-subspace rank per matrix (spec: 10).
        cer: the cumulative energy ratio the rank must reach, in (0, 1] (spec: 0.85).
        refresh_every: optimizer steps between safety-gradient refreshes; the subspace is cached in between
            (spec: 1).
        lowrank_above: matrices with both sides larger than this use ``torch.svd_lowrank``.
        adapter_name: the PEFT adapter (only used to reject unsupported LoRA variants; default: the active one).
    """

    state_settings = ("k_max", "cer", "refresh_every")

    def __init__(
        self,
        safety_samples: Optional[Sequence[SafetySample]] = None,
        tokenizer: Union[None, str, PreTrainedTokenizerBase] = None,
        training_format: str = "chat_template",
        max_length: int = 256,
        k_max: int = 10,
        cer: float = 0.85,
        refresh_every: int = 1,
        lowrank_above: int = 4096,
        adapter_name: Optional[str] = None,
    ) -> None:
        super().__init__(adapter_name)
        check_spf_settings(k_max, cer, refresh_every)
        if training_format not in ("chat_template", "alpaca"):
            raise ValueError(f"training_format must be 'chat_template' or 'alpaca', got {training_format!r}.")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}.")
        self.safety_samples = None if safety_samples is None else [_as_example(s) for s in safety_samples]
        if self.safety_samples is not None and not self.safety_samples:
            raise ValueError("safety_samples is empty: give at least one (harmful prompt, refusal) pair.")
        self.tokenizer = tokenizer
        self.training_format = training_format
        self.max_length = max_length
        self.k_max = k_max
        self.cer = cer
        self.refresh_every = refresh_every
        self.lowrank_above = lowrank_above
        self._stack: Optional[StackedSubspaces] = None
        self._saved_subspaces: dict[str, SafetySubspace] = {}
        self._batch: Optional[dict[str, Tensor]] = None
        self._params: list[tuple[str, nn.Parameter]] = []
        self.safety_passes = 0

    @override
    def reset(self) -> None:
        super().reset()
        self._stack = None
        self._saved_subspaces = {}
        self._batch = None
        self._params = []
        self.safety_passes = 0

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        _move_before_null_space_projection(trainer, self)
        samples = self.safety_samples
        if samples is None:
            found = getattr(trainer.datamodule, "safety_samples", None) if trainer.datamodule is not None else None
            samples = [_as_example(s) for s in (found() if callable(found) else found or [])]
        if not samples:
            raise ValueError(
                "SafetyGradientProjection needs at least one safety sample (harmful prompt + refusal): pass "
                "safety_samples=[(prompt, refusal), ...] or give the DataModule a `safety_samples` attribute."
            )
        tokenizer = resolve_tokenizer(self.tokenizer, trainer, pl_module)
        rows = []
        for sample in samples:
            row = tokenize_example(tokenizer, sample, self.training_format, self.max_length)
            response = [t for t in row["labels"] if t != -100 and t != tokenizer.eos_token_id]
            if not sample.response.strip() or not response:
                raise ValueError(
                    f"The safety sample {sample.prompt[:60]!r} has no refusal tokens left after truncation to "
                    f"max_length={self.max_length}: give a non-empty refusal or a larger max_length."
                )
            rows.append(row)
        self._batch = collate(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.lora_targets(pl_module)  # rejects DoRA and other variants, if LoRA is used at all
        lm = find_causal_lm(pl_module)
        self._params = [(n, p) for n, p in lm.named_parameters() if p.requires_grad and p.ndim == 2]
        if not self._params:
            raise ValueError("SafetyGradientProjection found no trainable matrix (2-D parameter) to protect.")
        if self._saved_subspaces:
            missing = [n for n, _ in self._params if n not in self._saved_subspaces]
            if missing:
                raise ValueError(
                    f"The checkpoint's SafetyGradientProjection state has no safety subspace for {missing[:3]} "
                    f"({len(missing)} trainable matrices): it was saved with other trainable parameters. Resume "
                    "with the model it was trained with."
                )
            self._stack = StackedSubspaces.from_subspaces([self._saved_subspaces[n] for n, _ in self._params])

    @torch.no_grad()
    def refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Recompute the safety gradient at the current weights and its per-matrix subspaces.

        Args:
            trainer: the Trainer (its precision plugin gives the training autocast).
            pl_module: the LightningModule being trained.
        """
        lm = find_causal_lm(pl_module)
        device = self._params[0][1].device
        batch = {k: v.to(device) for k, v in self._batch.items()}
        params = [p for _, p in self._params]
        was_training = lm.training
        lm.eval()  # dropout off: the safety gradient of the model itself, not of a random sub-network
        try:
            with torch.enable_grad(), trainer.precision_plugin.forward_context():
                grads = _safety_grads(lm, batch, params, loss_scale(trainer))
        finally:
            lm.train(was_training)
        self.safety_passes += 1
        grads = [g if g is not None else torch.zeros_like(full_tensor(p)) for g, (_, p) in zip(grads, self._params)]
        self._stack = safety_subspaces(grads, self.cer, self.k_max, self.lowrank_above)

    @property
    def subspaces(self) -> dict[str, SafetySubspace]:
        """The cached safety subspace of every protected matrix, by parameter name (empty before the first refresh)."""
        if self._stack is None:
            return {}
        return {name: sub for (name, _), sub in zip(self._params, self._stack.unstack())}

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if self._stack is None or trainer.global_step % self.refresh_every == 0:
            self.refresh(trainer, pl_module)
        with torch.no_grad():
            # Under FSDP2 the whole gradient, identical on every rank.
            grads = [None if p.grad is None else full_tensor(p.grad) for _, p in self._params]
            device = next((g.device for g in grads if g is not None), None)
            if device is not None:
                self._stack = self._stack.to(device)
            edit = remove_conflicts(grads, self._stack)
            gated = edit.gated.sum().clamp_min(1)
            means = torch.stack([edit.cosine_before.sum() / gated, edit.cosine_after.sum() / gated])
            # One host sync for the step: which gradients to write back, and the logged means.
            *flags, before, after = torch.cat([edit.conflicted.double(), means]).tolist()
            for (_, param), edited, conflicted in zip(self._params, edit.grads, flags):
                if conflicted:
                    write_full_(param.grad, edited)  # each rank keeps its own rows
        conflicts = float(sum(flags))
        self.last_metrics = {"spf/conflicts": conflicts, "spf/cosine_before": before, "spf/cosine_after": after}
        pl_module.log_dict(self.last_metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        subspaces = {n: {"u": s.u.cpu(), "s": s.s.cpu(), "v": s.v.cpu()} for n, s in self.subspaces.items()}
        return {**super().state_dict(), "subspaces": subspaces}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # A resume between refreshes must gate with the subspace the uninterrupted run would have cached.
        self._saved_subspaces = {
            n: SafetySubspace(s["u"], s["s"], s["v"]) for n, s in state_dict.get("subspaces", {}).items()
        }


def _safety_grads(
    lm: nn.Module, batch: Mapping[str, Tensor], params: Sequence[nn.Parameter], scale: float
) -> list[Optional[Tensor]]:
    """The safety loss's gradient of ``params`` (``.grad`` untouched), computed with the loss multiplied by ``scale``
    and divided out again.

    Under ``16-mixed`` ``scale`` is the GradScaler's: the fp16 backward then keeps small gradients from underflowing,
    as the task's backward does (a power of two, so dividing is exact). Should it overflow, the gradient is computed
    once more unscaled (the subspace cannot skip a step as the scaler does).
    """
    loss = response_loss(lm, **batch)
    if scale != 1.0:
        loss = loss * scale
    if any(isinstance(p, DTensor) for p in params):
        grads = _sharded_safety_grads(loss, params)
    else:
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
    if scale == 1.0:
        return grads
    grads = [None if g is None else g / scale for g in grads]
    finite = [g.isfinite().all() for g in grads if g is not None]
    if not finite or bool(torch.stack(finite).all()):
        return grads
    return _safety_grads(lm, batch, params, 1.0)


def _sharded_safety_grads(loss: Tensor, params: Sequence[nn.Parameter]) -> list[Optional[Tensor]]:
    """The full safety gradient of FSDP2-sharded parameters, on every rank, with their ``.grad`` left as it was.

    ``torch.autograd.grad`` cannot reach sharded parameters (FSDP2 computes with all-gathered copies and
    reduce-scatters into ``.grad`` in its post-backward hooks), so the utility gradients are set aside, the safety
    loss goes through a normal ``backward`` (every rank runs the same safety batch, so FSDP2's averaging
    reduce-scatter gives each rank its shard of that one gradient), the shards are gathered, and the utility
    gradients are put back.
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        grads = [None if p.grad is None else full_tensor(p.grad).detach().clone() for p in params]
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    return grads


def _as_example(sample: Any) -> Example:
    if isinstance(sample, Example):
        return sample
    if isinstance(sample, Mapping):
        prompt, response = sample.get("prompt"), sample.get("response", sample.get("refusal"))
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        prompt, response = sample
    else:
        prompt = response = None
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(
            "A safety sample is a (harmful prompt, refusal) pair or a dict with 'prompt' and 'response'; "
            f"got {sample!r}."
        )
    return Example(prompt, response)


def _move_before_null_space_projection(trainer: "pl.Trainer", callback: pl.Callback) -> None:
    """Place ``callback`` before the first ``NullSpaceProjection``, so the null-space projection acts last."""
    from .null_space_projection import NullSpaceProjection

    callbacks = trainer.callbacks
    first = next((i for i, c in enumerate(callbacks) if isinstance(c, NullSpaceProjection)), None)
    mine = next(i for i, c in enumerate(callbacks) if c is callback)
    if first is not None and first < mine:
        # Moving an element earlier leaves the later ones at their indices, so a hook loop running now is unaffected.
        callbacks.pop(mine)
        callbacks.insert(first, callback)
