"""``LSSFFusion``: after training, fold the safety vector projected onto each layer's safety subspace (LSSF)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import lightning.pytorch as pl
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.lssf import ATTENTION_MLP_PATTERN, LssfReport, check_lssf_settings, fuse_lssf_by_block
from guardspace_pl.prompts import PromptFormat
from guardspace_pl.safety_reference import SafetyReference, as_safety_reference

from .base import PostTrainingLoraCallback, find_causal_lm, resolve_tokenizer


class LSSFFusion(PostTrainingLoraCallback):
    r"""LSSF (Zhou et al., ACL 2025) at the end of ``fit``, on any LightningModule with PEFT LoRA layers.

    The model before fine-tuning (LoRA layers bypassed) answers ``anchor_prompts`` (harmful) greedily; its inputs to
    every LoRA layer over prompt + refusal give ``C = X^ X^^T``. Per attention/MLP layer the SVD of ``W X^`` gives
    ``U, sigma``; the entropy rank ``r_l`` (share ``eta``) and weights ``a_i`` give ``P' = U_r diag(a) U_r^T``, and
    ``alpha P' delta_safe`` is folded into the frozen base weight. Training is untouched, so it composes with other
    callbacks (e.g. ``NullSpaceProjection``). The reference and settings are checked at fit start. Under FSDP2
    (``ModelParallelStrategy``) every rank generates the refusals, the anchor covariances are summed over ranks, and
    each rank writes its own shard of the fused weights (the result equals one process's, tested).

    Args:
        reference: a ``SafetyReference`` (``delta_safe`` per module), or the directory of a PEFT safety-patch adapter.
        anchor_prompts: harmful prompts for the anchor activations (the first ``num_anchor_prompts`` are used), or a
            prompt source string as the DataModules take (e.g. ``"builtin:harmbench"``).
        tokenizer: the model's tokenizer or its name (default: the DataModule's or LightningModule's ``tokenizer``).
        alpha: the fusion strength, ``>= 0`` (choice 1; paper sweep {0.5, 1, 2}).
        eta: the entropy share fixing each layer's rank, in ``(0, 1]`` (choice 0.9; sweep 0.8-0.95).
        a1: the weight of the top safety direction in the weighted projector, ``> 0`` (choice 1: plain projector).
        num_anchor_prompts: how many anchor prompts to use (paper: 128, robust 16-512).
        max_new_tokens: length limit of the generated refusals (a choice).
        batch_size: prompts per generation/forward batch.
        prompt_format: ``"chat_template"`` (default) or ``"raw"``: how the prompts are shown to the model.
        module_pattern: a regular expression on Hugging Face module names; LSSF acts on matching LoRA layers
            (default: attention and MLP linears, as the paper).
        adapter_name: the PEFT adapter to act on (default: the single active one).
        report_path: JSON per-layer report (default ``<log_dir>/guardspace/lssf.json``), written by rank 0.
    """

    state_settings = ("alpha", "eta", "a1", "num_anchor_prompts", "max_new_tokens", "prompt_format", "module_pattern")
    report_filename = "lssf.json"
    report: Optional[LssfReport]

    def __init__(
        self,
        reference: Union[SafetyReference, str],
        anchor_prompts: Union[Sequence[str], str],
        tokenizer: Union[None, str, PreTrainedTokenizerBase] = None,
        alpha: float = 1.0,
        eta: float = 0.9,
        a1: float = 1.0,
        num_anchor_prompts: int = 128,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        prompt_format: PromptFormat = "chat_template",
        module_pattern: str = ATTENTION_MLP_PATTERN,
        adapter_name: Optional[str] = None,
        report_path: Optional[str] = None,
    ) -> None:
        super().__init__(adapter_name, report_path)
        check_lssf_settings(alpha, eta, a1, module_pattern)
        for name, value in (
            ("num_anchor_prompts", num_anchor_prompts), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if prompt_format not in ("chat_template", "raw"):
            raise ValueError(f"prompt_format must be 'chat_template' or 'raw', got {prompt_format!r}.")
        reference = as_safety_reference(reference)
        if isinstance(anchor_prompts, str):
            from guardspace_pl.datamodules.sources import load_prompts

            anchor_prompts = load_prompts(anchor_prompts)
        self.anchor_prompts = [p for p in anchor_prompts][:num_anchor_prompts]
        if not self.anchor_prompts:
            raise ValueError(
                "LSSF needs harmful anchor prompts; the anchor prompt set is empty. Pass e.g. 'builtin:harmbench'."
            )
        self.reference = reference
        self.tokenizer = tokenizer
        self.alpha = float(alpha)
        self.eta = float(eta)
        self.a1 = float(a1)
        self.num_anchor_prompts = num_anchor_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_format = prompt_format
        self.module_pattern = module_pattern

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Fail before training, from metadata only: shapes and coverage of the reference.
        self.reference.check_targets(self.lora_targets(pl_module))
        resolve_tokenizer(self.tokenizer, trainer, pl_module)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        targets = self.lora_targets(pl_module)
        tokenizer = resolve_tokenizer(self.tokenizer, trainer, pl_module)
        # One decoder block's anchor covariances at a time (all of a 7B model's at once outgrow the model itself).
        self.report, _ = fuse_lssf_by_block(
            find_causal_lm(pl_module), targets, self.reference, tokenizer, self.anchor_prompts, self.alpha, self.eta,
            self.a1, self.module_pattern, self.max_new_tokens, self.batch_size, self.prompt_format,
        )
        self.publish_report(trainer)

    @override
    def report_metrics(self) -> dict[str, float]:
        fused = [m for m in self.report.modules if m.skipped is None]
        return {"lssf/num_fused": float(len(fused)), "lssf/mean_rank": sum(m.rank for m in fused) / len(fused)}
