"""A refusal gate: a linear probe on the original model's activations decides which prompts get the safety patch.

A LoRA safety patch changes the model for every prompt, so its refusal decision is learned in the adapter and it
over-refuses safe prompts that look unsafe (BENCHMARKS.md, "Safety patch"). The original model's residual stream
already separates the prompts to refuse from the prompts to answer (``benchmarks/separability.py``): a
logistic-regression probe on one layer, at the last prompt token, is a better decision than the patch's own. Where
the probe's logit exceeds a threshold the gate answers with a refusal (a fixed text, or the patched model's own
answer); elsewhere the original model answers, unchanged, so its utility is kept wherever the gate is silent.
Measured on SmolLM2 (BENCHMARKS.md, "A refusal gate"), a fixed refusal beats the patch behind the gate: the patch
still complies with some prompts the gate flagged, so its misses add to the gate's.

The math is two pure functions (:func:`fit_linear_probe`, :meth:`LinearProbe.logits`); :func:`last_prompt_token_states`
gathers the activations; :class:`RefusalGate` holds one probe, its layer and threshold, and saves beside the patch's
PEFT adapter (``refusal_gate.safetensors`` + ``refusal_gate.json``: PEFT ignores both); :func:`gated_generate`
answers prompts with the patch on only where the gate fires.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from guardspace_pl.evaluation.generation import _check_inputs, _device, _inference, generate_responses, unwrap_model
from guardspace_pl.prompts import format_prompt

GATE_WEIGHTS = "refusal_gate.safetensors"
GATE_CONFIG = "refusal_gate.json"


class GateError(ValueError):
    """A refusal gate that cannot be fitted, loaded or used on this model."""


@dataclass(frozen=True)
class LinearProbe:
    """A logistic-regression probe on standardised features: ``logit(x) = ((x - mean) / scale) @ weight + bias``.

    Attributes:
        mean: the training features' mean, ``(hidden,)``.
        scale: their standard deviation (plus a small floor), ``(hidden,)``.
        weight: the probe's weights on the standardised features, ``(hidden,)``.
        bias: its bias, a 0-d tensor.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The probe's logit per row of ``features`` (``(n, hidden)`` -> ``(n,)``), in float64."""
        if features.shape[-1] != self.weight.shape[0]:
            raise GateError(
                f"The probe reads {self.weight.shape[0]} features but got {features.shape[-1]}: the gate was fitted on "
                "another model (hidden size differs). Fit a gate on this model."
            )
        return ((features.double() - self.mean) / self.scale) @ self.weight + self.bias


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, max_iter: int = 200
) -> LinearProbe:
    """An L2-regularised logistic regression on standardised ``features`` (LBFGS, float64).

    Args:
        features: ``(n, hidden)`` activations.
        labels: ``(n,)`` 1 (refuse) or 0 (answer); both classes must occur.
        l2: the penalty on the squared weights (of the standardised features).
        max_iter: LBFGS iterations.
    """
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise GateError(
            f"features must be (n, hidden) and labels (n,), got {tuple(features.shape)} and {tuple(labels.shape)}."
        )
    classes = set(labels.tolist())
    if classes != {0, 1}:
        raise GateError(
            f"A probe needs prompts to refuse (label 1) and prompts to answer (label 0); got labels {sorted(classes)}."
        )
    if l2 < 0:
        raise GateError(f"l2 must be >= 0, got {l2}.")
    features = features.double()
    mean, scale = features.mean(0), features.std(0) + 1e-8
    x = (features - mean) / scale
    weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = labels.double()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, target)
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


def cross_validated_accuracy(
    features: torch.Tensor, labels: torch.Tensor, folds: int = 5, l2: float = 1e-2, seed: int = 0
) -> float:
    """Balanced accuracy of :func:`fit_linear_probe` at logit 0 over stratified folds (each fold fits its own).

    Args:
        features: ``(n, hidden)`` activations.
        labels: ``(n,)`` 1 (refuse) or 0 (answer).
        folds: number of folds (each class needs at least this many prompts).
        l2: the probe's penalty.
        seed: the fold assignment's seed.
    """
    counts = {value: int((labels == value).sum()) for value in (0, 1)}
    if min(counts.values()) < folds:
        raise GateError(f"{folds}-fold cross-validation needs {folds} prompts per class, got {counts}.")
    generator = random.Random(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for value in (0, 1):
        index = (labels == value).nonzero().flatten().tolist()
        generator.shuffle(index)
        for i, j in enumerate(index):
            fold_of[j] = i % folds
    correct = {0: 0, 1: 0}
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        predicted = (fit_linear_probe(features[train], labels[train], l2).logits(features[test]) > 0).long()
        for value in (0, 1):
            mask = labels[test] == value
            correct[value] += int((predicted[mask] == value).sum())
    return 0.5 * (correct[0] / counts[0] + correct[1] / counts[1])


def check_layer(layer: int, num_hidden_layers: int, name: str = "Layer", hint: str = "") -> None:
    """A :class:`GateError` when ``layer`` is not a ``hidden_states`` index of a model with ``num_hidden_layers``
    decoder blocks (indices 0..num_hidden_layers, 0 = embeddings; negative ones count from the end).

    Args:
        layer: the index.
        num_hidden_layers: the model's decoder blocks.
        name: how the message names the setting.
        hint: what to do instead, appended to the message.
    """
    if not -num_hidden_layers - 1 <= layer <= num_hidden_layers:
        raise GateError(
            f"{name} {layer} does not exist: this model has layers 0..{num_hidden_layers} (0 = embeddings){hint}."
        )


def original_function(model: nn.Module) -> ContextManager[Any]:
    """A context in which ``model`` computes the original model's function: PEFT adapters switched off."""
    inner = unwrap_model(model)
    disable = getattr(inner, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


@torch.no_grad()
def last_prompt_token_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> torch.Tensor:
    """The residual stream at each prompt's last (chat-formatted) token: ``(layers, prompts, hidden)``, float64.

    Layer 0 is the embeddings' output, layer ``i`` the ``i``-th decoder block's (Hugging Face ``hidden_states``).

    Args:
        model: a Hugging Face causal LM or PEFT model (it runs as it is: wrap in :func:`original_function` to read
            the original model).
        tokenizer: its tokenizer (with a chat template and a pad token).
        prompts: plain prompts.
        layers: which layers (default: all).
        batch_size: prompts per forward pass.
        show_progress: a progress bar over batches.
    """
    _check_inputs(prompts, batch_size)
    model = unwrap_model(model)
    count = model.config.num_hidden_layers + 1  # hidden_states: the embeddings, then every decoder block
    chosen = list(range(count)) if layers is None else list(layers)
    for layer in chosen:
        check_layer(layer, model.config.num_hidden_layers)
    texts = [format_prompt(tokenizer, p, "chat_template") for p in prompts]
    out = []
    # Left padding: the last position is every prompt's own last token.
    with _inference(model, tokenizer, padding_side="left"):
        device = _device(model)
        for start in tqdm(range(0, len(texts), batch_size), desc="Reading activations", disable=not show_progress):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            hidden = model(**batch, output_hidden_states=True).hidden_states
            out.append(torch.stack([hidden[layer][:, -1].double().cpu() for layer in chosen]))
    return torch.cat(out, dim=1)


class RefusalGate:
    """A linear probe on one layer of the original model and a threshold: the gate fires where ``logit > threshold``.

    Args:
        probe: the fitted probe.
        layer: the ``hidden_states`` index it reads (0 = embeddings).
        threshold: the logit above which the gate fires (0 is the probe's own decision boundary; higher fires less).
        refusal: the answer to a prompt the gate fires on; ``None``: the patched model answers it (the safety
            patch as an active PEFT adapter).
        metadata: anything to save with it (training counts, the model it was fitted on).
    """

    def __init__(
        self,
        probe: LinearProbe,
        layer: int,
        threshold: float = 0.0,
        refusal: Optional[str] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> None:
        if refusal is not None and not refusal.strip():
            raise GateError("The gate's refusal is empty: pass the text to answer flagged prompts with, or None.")
        self.probe = probe
        self.layer = layer
        self.threshold = float(threshold)
        self.refusal = refusal
        self.metadata = dict(metadata or {})

    @property
    def hidden_size(self) -> int:
        return int(self.probe.weight.shape[0])

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        refuse: Sequence[str],
        answer: Sequence[str],
        layer: Optional[int] = None,
        threshold: float = 0.0,
        refusal: Optional[str] = None,
        l2: float = 1e-2,
        batch_size: int = 16,
        show_progress: bool = False,
    ) -> "RefusalGate":
        """Fit the probe on the original model's activations for prompts to refuse and prompts to answer.

        Args:
            model: the original model, or a PEFT model carrying the patch (its adapters are switched off here).
            tokenizer: its tokenizer.
            refuse: prompts the gate should fire on (harmful, unsafe contrasts).
            answer: prompts it should let through (harmless, borderline-safe).
            layer: the layer to read; ``None`` picks the layer whose probe has the best 5-fold cross-validated
                balanced accuracy on these prompts (ties: the earlier layer).
            threshold: the firing threshold on the probe's logit.
            refusal: the answer to flagged prompts (``None``: the patched model's).
            l2: the probe's penalty.
            batch_size: prompts per forward pass.
            show_progress: a progress bar over batches.
        """
        if not refuse or not answer:
            raise GateError(
                f"A refusal gate needs prompts to refuse and prompts to answer; got {len(refuse)} and {len(answer)}."
            )
        with original_function(model):
            states = last_prompt_token_states(
                model, tokenizer, list(refuse) + list(answer), None if layer is None else [layer], batch_size,
                show_progress,
            )
        labels = torch.tensor([1] * len(refuse) + [0] * len(answer))
        metadata: dict[str, Any] = {"refuse_prompts": len(refuse), "answer_prompts": len(answer), "l2": l2}
        if layer is None:
            accuracy = [cross_validated_accuracy(s, labels, l2=l2) for s in states]
            index = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))
            metadata["cross_validated_accuracy_by_layer"] = accuracy
            layer, features = index, states[index]
        else:
            features = states[0]
            if layer < 0:
                layer = layer % (unwrap_model(model).config.num_hidden_layers + 1)
        return cls(fit_linear_probe(features, labels, l2), layer, threshold, refusal, metadata)

    def scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
    ) -> torch.Tensor:
        """The probe's logit per prompt, read from the original model (PEFT adapters switched off)."""
        hidden_size = unwrap_model(model).config.hidden_size
        if hidden_size != self.hidden_size:
            raise GateError(
                f"This gate reads {self.hidden_size}-wide activations but the model's hidden size is {hidden_size}: "
                "it was fitted on another base model. Use the gate saved with this model's patch, or fit one."
            )
        with original_function(model):
            states = last_prompt_token_states(model, tokenizer, prompts, [self.layer], batch_size)
        return self.probe.logits(states[0])

    def fires(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
    ) -> list[bool]:
        """Per prompt, whether the gate fires (the patch answers it)."""
        return (self.scores(model, tokenizer, prompts, batch_size) > self.threshold).tolist()

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``refusal_gate.safetensors`` and ``refusal_gate.json`` into ``directory`` (e.g. the patch's folder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        probe = self.probe
        save_file(
            {"mean": probe.mean, "scale": probe.scale, "weight": probe.weight, "bias": probe.bias.reshape(1)},
            str(directory / GATE_WEIGHTS),
        )
        config = {
            "layer": self.layer,
            "threshold": self.threshold,
            "refusal": self.refusal,
            "hidden_size": self.hidden_size,
            **self.metadata,
        }
        (directory / GATE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Union[str, Path], threshold: Optional[float] = None) -> "RefusalGate":
        """The gate saved in ``directory``; ``threshold`` overrides the saved one."""
        directory = Path(directory)
        if not (directory / GATE_WEIGHTS).exists() or not (directory / GATE_CONFIG).exists():
            raise FileNotFoundError(
                f"{directory} holds no refusal gate ({GATE_WEIGHTS} and {GATE_CONFIG}): run `align` with "
                "gate.enabled=true, or RefusalGate.fit(...).save(directory)."
            )
        tensors = load_file(str(directory / GATE_WEIGHTS))
        config = json.loads((directory / GATE_CONFIG).read_text())
        probe = LinearProbe(tensors["mean"], tensors["scale"], tensors["weight"], tensors["bias"].reshape(()))
        metadata = {k: v for k, v in config.items() if k not in ("layer", "threshold", "refusal", "hidden_size")}
        threshold = config["threshold"] if threshold is None else threshold
        return cls(probe, int(config["layer"]), threshold, config.get("refusal"), metadata)

    def __repr__(self) -> str:
        answer = "a fixed refusal" if self.refusal is not None else "the patch"
        return (
            f"RefusalGate(layer={self.layer}, threshold={self.threshold:+g}, hidden_size={self.hidden_size}, "
            f"fired -> {answer})"
        )


@dataclass(frozen=True)
class GatedAnswer:
    """One prompt's answer from :func:`gated_generate`: the text, whether the gate fired, and the probe's logit."""

    prompt: str
    answer: str
    fired: bool
    score: float


def gated_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    gate: RefusalGate,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    refusal: Optional[str] = None,
    show_progress: bool = True,
) -> list[GatedAnswer]:
    """Greedy answers: the original model's where ``gate`` is silent, a refusal where it fires, in the prompts' order.

    Where it fires the answer is ``refusal``, else the gate's own ``refusal``, else (both ``None``) the patched
    model's answer.

    Args:
        model: any causal LM (PEFT adapters are switched off for the prompts the gate lets through); when the
            patch answers flagged prompts, a ``PeftModel`` whose active adapter is the safety patch
            (``apply_patches(model, [patch], mode="active")``).
        tokenizer: its tokenizer.
        prompts: plain prompts.
        gate: the refusal gate (fitted on this base model).
        max_new_tokens: greedy tokens per answer.
        batch_size: prompts per generation batch.
        refusal: the answer to the prompts the gate fires on (overrides the gate's).
        show_progress: progress bars over generation batches.
    """
    _check_inputs(prompts, batch_size)
    inner = unwrap_model(model)
    refusal = refusal if refusal is not None else gate.refusal
    if refusal is None and not callable(getattr(inner, "disable_adapter", None)):
        raise GateError(
            "This gate lets the patched model answer the prompts it flags, but the model carries no PEFT adapter: "
            "apply the patch (apply_patches(model, [patch_dir], mode='active')), or pass a fixed `refusal`."
        )
    scores = gate.scores(model, tokenizer, prompts, batch_size).tolist()
    fired = [s > gate.threshold for s in scores]
    answers = [""] * len(prompts)
    flagged = [i for i, f in enumerate(fired) if f]
    passed = [i for i, f in enumerate(fired) if not f]
    if passed:
        with original_function(model):
            for i, text in zip(passed, generate_responses(
                model, tokenizer, [prompts[i] for i in passed], max_new_tokens, batch_size, show_progress=show_progress
            )):
                answers[i] = text.strip()
    if flagged:
        if refusal is not None:
            texts = [refusal] * len(flagged)
        else:
            texts = generate_responses(
                model, tokenizer, [prompts[i] for i in flagged], max_new_tokens, batch_size, show_progress=show_progress
            )
        for i, text in zip(flagged, texts):
            answers[i] = text.strip()
    return [GatedAnswer(p, a, f, s) for p, a, f, s in zip(prompts, answers, fired, scores)]


__all__ = [
    "GATE_CONFIG",
    "GATE_WEIGHTS",
    "GateError",
    "GatedAnswer",
    "LinearProbe",
    "RefusalGate",
    "check_layer",
    "cross_validated_accuracy",
    "fit_linear_probe",
    "gated_generate",
    "last_prompt_token_states",
    "original_function",
]
