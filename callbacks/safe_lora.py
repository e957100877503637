"""``SafeLoRA``: after training, project the LoRA updates least aligned with safety onto the alignment subspace."""

from __future__ import annotations

from typing import Optional, Union

import lightning.pytorch as pl
from typing_extensions import override

from guardspace_pl.safelora import (
    ComputeDtype,
    Projector,
    SafeLoraReport,
    SelectionMode,
    apply_safelora,
    check_safelora_settings,
)
from guardspace_pl.safety_reference import SafetyReference, as_safety_reference

from .base import PostTrainingLoraCallback


class SafeLoRA(PostTrainingLoraCallback):
    r"""SafeLoRA (Hsu et al., NeurIPS 2024) at the end of ``fit``, on any LightningModule with PEFT LoRA layers.

    For each LoRA layer with alignment vector ``V = W_aligned - W_base`` (from ``reference``), the similarity
    ``cos(C B A, B A)`` with ``C = V V^T / ||V||_F`` is computed from the trained, unprojected weights; the least
    similar modules (``number`` mode: the K lowest; ``threshold`` mode: cosine <= tau) get ``B <- C B``. Training
    is untouched; only ``on_fit_end`` changes the adapter, so it composes with other callbacks (e.g.
    ``NullSpaceProjection``) and with FSDP2. The reference is checked against the model at fit start (shapes,
    coverage, K), so a wrong reference fails before training rather than after.

    Args:
        reference: a ``SafetyReference``, or the directory of a PEFT safety-patch adapter to build one from.
        mode: ``"number"`` (paper default: project the K modules of lowest similarity) or ``"threshold"``.
        num_projected_modules: K in ``number`` mode (paper: 10).
        threshold: tau in ``threshold`` mode, a cosine in [-1, 1] (paper: 0.5).
        projector: ``"faithful"`` (``C = V V^T / ||V||_F``, the paper) or ``"orthonormal"`` (a choice:
            ``U U^T`` onto the column space of ``V``; with a low-rank ``V`` the faithful ``C`` rescales ``B`` by
            ``sigma^2 / ||V||_F`` and can nearly zero it).
        dtype: the dtype of the computation (``"float32"`` as the official code, or ``"float64"``).
        adapter_name: the PEFT adapter to act on (default: the single active one).
        report_path: JSON per-module report (default ``<log_dir>/guardspace/safelora.json``), written by rank 0.
    """

    state_settings = ("mode", "num_projected_modules", "threshold", "projector", "dtype")
    report_filename = "safelora.json"
    report: Optional[SafeLoraReport]

    def __init__(
        self,
        reference: Union[SafetyReference, str],
        mode: SelectionMode = "number",
        num_projected_modules: int = 10,
        threshold: float = 0.5,
        projector: Projector = "faithful",
        dtype: ComputeDtype = "float32",
        adapter_name: Optional[str] = None,
        report_path: Optional[str] = None,
    ) -> None:
        super().__init__(adapter_name, report_path)
        check_safelora_settings(mode, num_projected_modules, threshold, projector, dtype)
        self.reference = as_safety_reference(reference)
        self.mode = mode
        self.num_projected_modules = num_projected_modules
        self.threshold = float(threshold)
        self.projector = projector
        self.dtype = dtype

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Fail now, not after hours of training: shapes, coverage and K need only metadata.
        covered = self.reference.check_targets(self.lora_targets(pl_module))
        if self.mode == "number" and self.num_projected_modules > len(covered):
            raise ValueError(
                f"SafeLoRA: num_projected_modules (K) = {self.num_projected_modules} but the safety reference covers "
                f"only {len(covered)} LoRA layers. Pass K <= {len(covered)}, or mode='threshold'."
            )

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.report = apply_safelora(
            self.lora_targets(pl_module), self.reference, self.mode, self.num_projected_modules, self.threshold,
            self.projector, self.dtype,
        )
        self.publish_report(trainer)

    @override
    def report_metrics(self) -> dict[str, float]:
        return {"safelora/num_projected": float(len(self.report.projected_names)), "safelora/pdst": self.report.pdst}
