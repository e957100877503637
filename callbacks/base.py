"""Base classes of this package's callbacks: what every safety callback on PEFT LoRA layers shares.

``LoraCallback``: the strategy check, the LoRA layers of the model being fit (unsupported PEFT variants
rejected), fresh state for every fit, and settings that a resumed checkpoint must match.

``PostTrainingLoraCallback``: a ``LoraCallback`` that changes the trained model once, at the end of ``fit``, and
reports what it did (JSON file, log line, logger metrics, checkpoint state).

``CalibratedLoraCallback``: a ``LoraCallback`` that runs harmful calibration prompts through the model once per
fit, in the sequence fingerprint -> cache -> compute -> save -> report, and initialises either at fit start or,
under strategies that restore checkpoints after set-up (FSDP2), at train start.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.calibration import SampleNormalization, fingerprint
from guardspace_pl.distributed import all_reduce_sum_, local_tensor, rank
from guardspace_pl.lora import LoraTarget, find_lora_targets
from guardspace_pl.prompts import PromptFormat, encode_prompts

CalibrationKind = Literal["subspace", "null_space"]
_SAMPLE_NORMALIZATIONS = ("max", "max_abs", "none")
_PROMPT_FORMATS = ("raw", "chat_template")


class LoraCallback(Callback):
    """Shared behaviour of every callback that acts on the PEFT LoRA layers of a LightningModule.

    Subclasses list in ``state_settings`` the constructor settings their saved state depends on: they are written
    into every checkpoint and compared when one is restored, so resuming with another value is an error that
    names the setting instead of a silent mix of two configurations.

    Args:
        adapter_name: the PEFT adapter to act on (default: the single active one).
    """

    #: constructor settings saved in the checkpoint and compared on resume
    state_settings: tuple[str, ...] = ()

    def __init__(self, adapter_name: Optional[str] = None) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        #: True once ``load_state_dict`` restored this callback's state from a checkpoint in the current fit
        self.restored = False

    @property
    @override
    def state_key(self) -> str:
        # Stable across settings: a checkpoint written with other settings is found, then rejected by name.
        if self.adapter_name:
            return self._generate_state_key(adapter_name=self.adapter_name)
        return type(self).__qualname__

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit":
            # A reused instance must not carry one model's state (projectors, factors) into another fit;
            # a resumed fit gets its state back from the checkpoint after this hook.
            self.reset()

    def reset(self) -> None:
        """Forget everything computed for a previous fit. Subclasses clear their own state and call this."""
        self.restored = False

    def settings(self) -> dict[str, Any]:
        """The values of ``state_settings``, as saved in checkpoints."""
        return {name: getattr(self, name) for name in self.state_settings}

    def lora_targets(self, pl_module: nn.Module) -> list[LoraTarget]:
        """The LoRA layers of the chosen adapter; LoRA variants whose update is not ``s B A`` are rejected."""
        targets = find_lora_targets(pl_module, self.adapter_name)
        for target in targets:
            check_plain_lora(target, type(self).__name__)
        return targets

    def require_only_lora_trainable(self, pl_module: nn.Module, targets: Sequence[LoraTarget]) -> None:
        """Error if a trainable parameter of the language model is not a ``lora_A``/``lora_B`` of ``targets``.

        Args:
            pl_module: the LightningModule (or model) being trained.
            targets: the LoRA layers the callback acts on.
        """
        allowed = {id(t.lora_A) for t in targets} | {id(t.lora_B) for t in targets}
        # Only the language model's outputs are protected: a trainable head beside it (e.g. a value head) is not
        # part of them.
        lm = next((m for m in pl_module.modules() if isinstance(m, (PeftModel, PreTrainedModel))), pl_module)
        others = [name for name, p in lm.named_parameters() if p.requires_grad and id(p) not in allowed]
        if others:
            raise ValueError(
                f"{type(self).__name__} protects the model only when the LoRA factors of the adapted linear layers "
                f"are the only trainable parameters, but {len(others)} others are trainable, e.g. {others[:3]}. "
                "Remove modules_to_save / trainable_token_indices, use bias='none' and lora_bias=False in the "
                "LoraConfig, or freeze those parameters."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("settings")
        if saved is None:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} state has no settings: it was written by an older version "
                "of guardspace_pl. Start a new run, or resume with the version that wrote it."
            )
        current = self.settings()
        changed = {
            name: (saved[name], value) for name, value in current.items() if name in saved and saved[name] != value
        }
        if changed:
            detail = ", ".join(
                f"{name}={old!r} in the checkpoint but {new!r} now" for name, (old, new) in changed.items()
            )
            raise ValueError(
                f"{type(self).__name__} is resumed with other settings than the checkpoint was trained with: {detail}. "
                "Resume with the checkpoint's settings, or start a new run to use the new ones."
            )
        self.restored = True


class PostTrainingLoraCallback(LoraCallback):
    """A ``LoraCallback`` that changes the trained model once, in ``on_fit_end``, and reports what it did.

    Subclasses set ``self.report`` (an object with ``to_dict()`` and ``summary()``) in ``on_fit_end``, then call
    :meth:`publish_report`; they name the logged numbers in :meth:`report_metrics`. Checkpoints written after
    ``on_fit_end`` carry the report.

    Args:
        adapter_name: the PEFT adapter to act on (default: the single active one).
        report_path: the JSON report (default ``<log_dir>/guardspace/<report_filename>``), written by rank 0.
    """

    #: file name of the default report
    report_filename = "report.json"

    def __init__(self, adapter_name: Optional[str] = None, report_path: Optional[str] = None) -> None:
        super().__init__(adapter_name)
        self.report_path = report_path
        self.report: Optional[Any] = None

    @override
    def reset(self) -> None:
        super().reset()
        self.report = None

    def report_metrics(self) -> dict[str, float]:
        """The numbers of ``self.report`` sent to the trainer's logger."""
        raise NotImplementedError

    def publish_report(self, trainer: "pl.Trainer") -> None:
        """Write ``self.report`` as JSON, log its summary, and send :meth:`report_metrics` to the logger."""
        write_json(default_output_path(trainer, self.report_filename, self.report_path), self.report.to_dict())
        rank_zero_info(self.report.summary())
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.report_metrics(), step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "report": self.report.to_dict() if self.report is not None else None}


class CalibratedLoraCallback(LoraCallback):
    """A ``LoraCallback`` that computes something from calibration prompts once per fit, and caches it.

    Prompts come from ``calibration_prompts`` or the DataModule's ``calibration_prompts(kind)``; the tokenizer
    from ``tokenizer`` or the DataModule's/LightningModule's ``tokenizer`` attribute. Subclasses implement
    :meth:`_fingerprint_parts`, :meth:`_compute` and :meth:`_apply`.

    Args:
        calibration_prompts: harmful prompts to calibrate on (default: the DataModule's).
        tokenizer: a tokenizer, or a name/path to load one (default: the DataModule's or LightningModule's).
        prompt_format: ``"raw"`` (the paper) or ``"chat_template"``; default: the DataModule's training format.
        sample_normalization: per-sample scaling before the covariance (``"max"`` as the official code).
        max_length: calibration prompts longer than this are cut in the middle (a warning counts them).
        batch_size: calibration prompts per forward pass (padding is masked out of the covariance).
        covariance_dtype: accumulate covariances in ``float32`` (paper) or ``float64``.
        adapter_name: the PEFT adapter to act on (default: the single active one).
        cache_dir: cache the result here, keyed by model weights, prompts and settings, so a restarted run does
            not recompute it; checked writable before computing; a corrupt file is recomputed with a warning.
        report_path: the per-layer JSON report (default ``<log_dir>/guardspace/<report_filename>``).
        progress_bar: show progress over calibration batches.
    """

    #: which of the DataModule's calibration sets to use
    calibration_kind: CalibrationKind = "subspace"
    #: file name of the default report and prefix of cache files
    report_filename = "report.json"
    cache_prefix = "calibration"

    def __init__(
        self,
        calibration_prompts: Optional[Sequence[str]] = None,
        tokenizer: Union[None, str, PreTrainedTokenizerBase] = None,
        prompt_format: Optional[PromptFormat] = None,
        sample_normalization: SampleNormalization = "max",
        max_length: int = 2048,
        batch_size: int = 8,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        adapter_name: Optional[str] = None,
        cache_dir: Optional[str] = None,
        report_path: Optional[str] = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(adapter_name)
        if calibration_prompts is not None:
            if isinstance(calibration_prompts, str):
                raise TypeError("calibration_prompts must be a list of prompts, not one string; wrap it in a list.")
            if len(calibration_prompts) == 0:
                raise ValueError(
                    "calibration_prompts is empty: pass harmful prompts (e.g. AdvBench's behaviours), or leave it "
                    "unset so the DataModule serves them."
                )
        if prompt_format is not None and prompt_format not in _PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {_PROMPT_FORMATS} (or None for the DataModule's), got {prompt_format!r}."
            )
        if sample_normalization not in _SAMPLE_NORMALIZATIONS:
            raise ValueError(
                f"sample_normalization must be one of {_SAMPLE_NORMALIZATIONS}, got {sample_normalization!r}."
            )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 prompt per forward pass, got {batch_size}.")
        if covariance_dtype not in ("float32", "float64"):
            raise ValueError(f"covariance_dtype must be 'float32' or 'float64', got {covariance_dtype!r}.")
        self.calibration_prompts = list(calibration_prompts) if calibration_prompts is not None else None
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.sample_normalization = sample_normalization
        self.max_length = max_length
        self.batch_size = batch_size
        self.covariance_dtype = covariance_dtype
        self.cache_dir = cache_dir
        self.report_path = report_path
        self.progress_bar = progress_bar
        self.report: list[dict[str, Any]] = []
        self.loaded_from_cache = False
        self.initialized = False

    @override
    def reset(self) -> None:
        super().reset()
        self.report = []
        self.loaded_from_cache = False
        self.initialized = False

    # ------------------------------------------------------------------ when to initialise
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Sharded strategies restore a checkpoint only after this hook (and only then is trainer.ckpt_path
        # known): initialise in on_train_start there, so a resumed run neither recomputes nor loses state.
        if not trainer.strategy.restore_checkpoint_after_setup:
            self.initialize(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.initialize(trainer, pl_module)

    def initialize(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Compute (or load) and apply once per fit; on resume, check that the checkpoint carried the state."""
        if self.initialized:
            return
        self.initialized = True
        targets = self.lora_targets(pl_module)
        self._check_targets(pl_module, targets)
        if trainer.ckpt_path is not None:
            if not self.restored:
                raise ValueError(
                    f"Resuming from {trainer.ckpt_path}, which holds no {type(self).__name__} state: it was not "
                    f"trained with this callback, so its adapters were never set up by it. Resume from a checkpoint "
                    f"of a run that used {type(self).__name__}, or start a new run (no ckpt_path)."
                )
            self._on_resume(trainer, pl_module, targets)
            return
        check_finite_weights(targets)
        token_ids, tokenizer, prompt_format = self._calibration_token_ids(trainer, pl_module)
        key = fingerprint(
            type(self).__name__, self.settings(), prompt_format, *self._fingerprint_parts(targets, token_ids)
        )
        cache = CalibrationCache(self.cache_dir, self.cache_prefix, key)
        payload = cache.load()
        self.loaded_from_cache = payload is not None
        if payload is None:
            cache.check_writable()  # fail now, not after the whole computation
            payload = self._compute(trainer, pl_module, targets, token_ids, tokenizer)
            cache.save(payload)
        else:
            rank_zero_info(f"{type(self).__name__}: loaded from {cache.path}.")
        self._apply(trainer, pl_module, targets, payload)
        write_json(default_output_path(trainer, self.report_filename, self.report_path), self.report)

    # ------------------------------------------------------------------ for subclasses
    def _check_targets(self, pl_module: nn.Module, targets: list[LoraTarget]) -> None:
        """Extra checks on the layers before anything is computed (default: none)."""

    def _fingerprint_parts(self, targets: list[LoraTarget], token_ids: list[list[int]]) -> tuple:
        """What, besides the settings and prompt format, the cached result depends on."""
        return ([(t.name, t.shape, t.rank, t.scaling) for t in targets], weight_statistics(targets), token_ids)

    def _compute(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget],
        token_ids: list[list[int]], tokenizer: PreTrainedTokenizerBase,
    ) -> dict[str, Any]:
        """Calibrate and return a payload of tensors and plain data (cached as is); sets ``self.report``."""
        raise NotImplementedError

    def _apply(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget], payload: dict[str, Any]
    ) -> None:
        """Use a computed or cached payload on the model."""
        raise NotImplementedError

    def _on_resume(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", targets: list[LoraTarget]) -> None:
        """The checkpoint restored this callback's state and the model's weights (default: nothing else to do)."""

    def _calibration_token_ids(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> tuple[list[list[int]], PreTrainedTokenizerBase, PromptFormat]:
        tok = resolve_tokenizer(self.tokenizer, trainer, pl_module)
        fmt = resolve_prompt_format(self.prompt_format, trainer)
        prompts = resolve_prompts(self.calibration_prompts, self.calibration_kind, trainer)
        ids = encode_prompts(tok, prompts, fmt, self.max_length)
        return ids, tok, fmt

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initialized": self.initialized, "report": self.report}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.report = list(state_dict.get("report", []))


# ---------------------------------------------------------------------------------------------- glue
def check_strategy(trainer: "pl.Trainer", callback: str) -> None:
    """FSDP1 and DeepSpeed flatten parameters and gradients into 1-D shards: row-wise math would be wrong there."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"{callback} does not support {type(trainer.strategy).__name__}: it shards flattened parameters, so "
            "the adapters' rows are not whole on any rank. Use FSDP2 instead: "
            "strategy=ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1)."
        )


def check_plain_lora(target: LoraTarget, callback: str) -> None:
    """Reject PEFT LoRA variants whose update is not ``s * B @ A`` on the layer's input."""
    layer, adapter = target.layer, target.adapter
    if layer.use_dora.get(adapter, False):
        raise ValueError(
            f"{callback} does not support DoRA ({target.name} has use_dora=True): DoRA rescales the whole weight by a "
            "trained magnitude vector, so projecting B A does not protect the outputs. Use use_dora=False."
        )
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None:
        raise ValueError(
            f"{callback} does not support the LoRA variant {type(variant).__name__} of {target.name}: its update is "
            "not s * B @ A. Use plain LoRA (no use_dora / alora_invocation_tokens / other variants)."
        )
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(
            f"{callback} does not support lora_bias=True ({target.name}): the trained bias of lora_B shifts the "
            "outputs on every prompt, harmful ones included. Use lora_bias=False."
        )


def check_finite_weights(targets: Sequence[LoraTarget]) -> None:
    """Name the layers whose frozen weight or adapter holds NaN/inf, before any calibration runs on them."""
    bad = torch.tensor(
        [
            float(not all(torch.isfinite(local_tensor(p)).all() for p in (t.base.weight, t.lora_A, t.lora_B)))
            for t in targets
        ],
        dtype=torch.float64,
        device=local_tensor(targets[0].base.weight).device,
    )
    all_reduce_sum_(bad)  # every rank raises together under FSDP2
    names = [t.name for t, flag in zip(targets, bad.tolist()) if flag > 0]
    if names:
        raise ValueError(
            f"{len(names)} LoRA layer(s) hold NaN or inf weights, e.g. {names[:3]}: the model is broken before "
            "training. Reload the checkpoint, or check the dtype it was loaded in (float16 overflows)."
        )


def loss_scale(trainer: "pl.Trainer") -> float:
    """The GradScaler's current loss scale when one is active (``16-mixed``), else 1.0.

    Gradients are multiplied by it from the backward until the scaler unscales them, just before
    ``on_before_optimizer_step``: a gradient added in ``on_after_backward`` must be multiplied by it too.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def find_causal_lm(pl_module: nn.Module) -> nn.Module:
    """The outermost PEFT or Hugging Face model inside the LightningModule: what calibration runs."""
    for module in pl_module.modules():
        if isinstance(module, (PeftModel, PreTrainedModel)):
            return module
    raise ValueError(
        f"{type(pl_module).__name__} holds no Hugging Face/PEFT model: the callbacks need one to run the "
        "calibration prompts through."
    )


def resolve_tokenizer(
    tokenizer: Union[None, str, PreTrainedTokenizerBase], trainer: "pl.Trainer", pl_module: "pl.LightningModule"
) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, str):
        from guardspace_pl.loading import load_tokenizer

        return load_tokenizer(tokenizer)
    if tokenizer is not None:
        return tokenizer
    for owner in (trainer.datamodule, pl_module):
        found = getattr(owner, "tokenizer", None) if owner is not None else None
        if found is not None:
            return found
    raise ValueError(
        "No tokenizer for the calibration prompts: pass tokenizer= to the callback, or use a DataModule or "
        "LightningModule with a `tokenizer` attribute."
    )


def resolve_prompts(prompts: Optional[Sequence[str]], kind: CalibrationKind, trainer: "pl.Trainer") -> list[str]:
    if prompts is not None:
        return list(prompts)
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "calibration_prompts"):
        return list(datamodule.calibration_prompts(kind))
    raise ValueError(
        "No calibration prompts: pass calibration_prompts= (a list of harmful prompts) to the callback, or use "
        "guardspace_pl.datamodules.GuardSpaceDataModule, which serves them."
    )


def resolve_prompt_format(prompt_format: Optional[PromptFormat], trainer: "pl.Trainer") -> PromptFormat:
    """Explicit setting, else the DataModule's training format (calibrate as the model is trained), else raw."""
    if prompt_format is not None:
        return prompt_format
    return getattr(trainer.datamodule, "prompt_format", None) or "raw"


def weight_statistics(targets: Sequence[LoraTarget]) -> Tensor:
    """Per-layer ``(sum, sum of squares)`` of the frozen weight and both factors, reduced over shards: a cheap
    identity."""
    rows = []
    for target in targets:
        for param in (target.base.weight, target.lora_A, target.lora_B):
            local = local_tensor(param).double()
            rows.append(torch.stack([local.sum(), local.pow(2).sum()]))
    stats = torch.stack(rows)
    all_reduce_sum_(stats)
    # Rounded so that a different summation order (another shard layout) gives the same cache key.
    return torch.tensor([float(f"{v:.8e}") for v in stats.flatten().tolist()], dtype=torch.float64)


def default_output_path(trainer: "pl.Trainer", filename: str, explicit: Optional[str]) -> Path:
    if explicit:
        return Path(explicit)
    return Path(trainer.log_dir or trainer.default_root_dir) / "guardspace" / filename


def write_json(path: Path, payload: Any) -> None:
    from guardspace_pl.io import write_json as _write

    _write(path, payload)


class CalibrationCache:
    """One cache file per fingerprint in ``directory`` (or no caching when it is None).

    A file that cannot be read (truncated, corrupt, from an incompatible version) is recomputed with a warning;
    an unwritable directory is an error raised before the computation it would have lost.
    """

    def __init__(self, directory: Optional[str], prefix: str, key: str) -> None:
        self.path = Path(directory) / f"{prefix}_{key}.pt" if directory else None

    def load(self) -> Optional[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict):
                raise ValueError(f"expected a dict, found {type(payload).__name__}")
            return payload
        except (
            OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile
        ) as error:
            rank_zero_warn(
                f"The cache file {self.path} cannot be read ({type(error).__name__}: {error}); recomputing it."
            )
            return None

    def check_writable(self) -> None:
        if self.path is None or rank() != 0:
            return
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
                pass
        except OSError as error:
            raise PermissionError(
                f"cache_dir {directory} is not writable ({error}): the result would be lost after computing it. "
                "Pass a writable cache_dir, or cache_dir=None to compute without caching."
            ) from error

    def save(self, payload: dict[str, Any]) -> None:
        if self.path is None or rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)
