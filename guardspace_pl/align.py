"""``python -m guardspace_pl align --config configs/safety_patch_smollm2.yaml``: train a LoRA safety patch.

The patch (arXiv 2510.09004; SAFETY_METHODS.md section 5) is a LoRA adapter trained on safety data only:
harmful prompts -> refusals, safe prompts -> the original model's own answers (``SafetyPatchDataModule``). It is
written as a standard PEFT adapter (``<output_dir>/patch``, loads with ``PeftModel.from_pretrained``) and is the
safety reference the other methods read when there is no separate base/chat pair (``SafetyReference``).

After training, the report (``<output_dir>/report.json`` and ``report.md``) loads the saved adapter onto a fresh
copy of the original model and measures, on the DataModule's held-out sets, the original and the patched model:
harmful score and refusal rate with 95 % intervals, how many of the first answer tokens the patch changes on safe
prompts, the answer loss on utility pairs (e.g. GSM8K), and the paper's orthogonality diagnostic per module.
``--kind merged`` also writes the patched model with the adapter merged (``<output_dir>/merged``).

With ``gate.enabled``, a refusal gate (``guardspace_pl.refusal_gate``: a linear probe on the original model's
activations, fitted on the same training prompts) is saved beside the adapter, and the report adds the gated model
both ways: the original model answers what the gate lets through, and a flagged prompt gets a fixed refusal
(``gated_refusal``) or the patched model's answer (``gated_patch``); ``gate.respond`` says which one the gate ships.

The command follows ``fit``'s LightningCLI conventions: ``--config``, ``--print_config``, unknown keys rejected.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from transformers import PreTrainedTokenizerBase

from guardspace_pl.datamodules.safety import SafetyPatchDataModule
from guardspace_pl.evaluation.answer_cache import cached_greedy_answers
from guardspace_pl.evaluation.generation import (
    answer_token_losses_by_batch,
    generate_responses,
    teacher_forced_loss,
)
from guardspace_pl.evaluation.intervals import wilson_interval
from guardspace_pl.evaluation.judges import KeywordRefusalJudge
from guardspace_pl.io import write_json
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.model import GuardSpaceLM
from guardspace_pl.patch_diagnostics import (
    changed_token_fraction,
    orthogonality_report,
    relative_change,
    summarise_orthogonality,
)
from guardspace_pl.refusal_gate import RefusalGate, check_layer

PATCH_SUBDIR = "patch"
MERGED_SUBDIR = "merged"


@dataclass(frozen=True)
class ReportSettings:
    """What the report measures after training.

    Args:
        enabled: measure at all (off: only the adapter and the training summary are written).
        max_new_tokens: greedy tokens per answer for the harmful score and the refusal rate.
        drift_tokens: how many leading answer tokens the answer-drift diagnostic compares.
        batch_size: prompts per generation batch.
    """

    enabled: bool = True
    max_new_tokens: int = 48
    drift_tokens: int = 16
    batch_size: int = 16


@dataclass(frozen=True)
class GateSettings:
    """The refusal gate saved beside the patch (``guardspace_pl.refusal_gate``).

    Args:
        enabled: fit and save a gate, and report the gated model.
        layer: the ``hidden_states`` layer the probe reads (0 = embeddings); ``null``: the layer with the best
            cross-validated accuracy on the training prompts.
        threshold: the gate fires where the probe's logit exceeds it (0: the probe's own boundary; higher: fewer
            safe prompts refused, more harmful ones let through). Choose it on validation prompts
            (``benchmarks/probe_gate.py``).
        respond: what a flagged prompt gets: ``refusal`` (a fixed text) or ``patch`` (the patched model's answer).
        refusal: the fixed refusal; ``null``: the data's first refusal phrasing.
        l2: the probe's L2 penalty.
    """

    enabled: bool = False
    layer: Optional[int] = None
    threshold: float = 0.0
    respond: Literal["refusal", "patch"] = "refusal"
    refusal: Optional[str] = None
    l2: float = 1e-2

    def __post_init__(self) -> None:
        if self.refusal is not None and not self.refusal.strip():
            raise ValueError("gate.refusal is empty: give the refusal text, or null for the data's first phrasing.")
        if self.l2 < 0:
            raise ValueError(f"gate.l2 must be >= 0, got {self.l2}.")


def check_gate_layer(settings: GateSettings, num_hidden_layers: int) -> None:
    """An error, before any training, when ``gate.layer`` is not one of the model's ``hidden_states`` layers.

    Args:
        settings: the gate's settings.
        num_hidden_layers: the model's decoder blocks (``hidden_states`` has one more: the embeddings).
    """
    if settings.enabled and settings.layer is not None:
        hint = "; use one of them, or null for the best cross-validated layer"
        check_layer(settings.layer, num_hidden_layers, "gate.layer", hint)


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    """A percentage with its 95 % Wilson interval and its counts.

    Args:
        flags: one flag per prompt.
    """
    low, high = wilson_interval(sum(flags), len(flags))
    return {
        "percent": 100.0 * sum(flags) / len(flags),
        "ci95": [100.0 * low, 100.0 * high],
        "count": sum(flags),
        "n": len(flags),
    }


def patch_factors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The frozen weights and the patch's ``(s B, A)`` of every LoRA layer of ``model``, by Hugging Face name.

    Args:
        model: a ``PeftModel`` with one LoRA adapter (the patch).
    """
    weights, factors = {}, {}
    for target in find_lora_targets(model):
        weight, lora_A, lora_B = target.full()
        weights[target.hf_name] = weight.detach().float().cpu()
        factors[target.hf_name] = ((target.scaling * lora_B).detach().float().cpu(), lora_A.detach().float().cpu())
    return weights, factors


@torch.no_grad()
def evaluate_patch(
    patched: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    evaluation: dict[str, tuple[str, list[str]]],
    utility: Sequence[Any],
    original_cache: Path,
    settings: ReportSettings = ReportSettings(),
    gate: Optional[RefusalGate] = None,
    gate_refusal: Optional[str] = None,
) -> dict[str, Any]:
    """Original versus patched model on held-out sets: harmful score or refusal rate, answer drift, utility loss.

    With a ``gate``, also the gated model both ways (the original answer where the gate is silent; where it fires,
    the fixed refusal ``gate.refusal`` or the patched answer: what ``gated_generate`` returns), how often the gate
    fires per set, and the gated utility loss.

    ``patched`` is a ``PeftModel`` whose active adapter is the patch; the original model is the same model with
    the adapter disabled (its answers are cached in ``original_cache``, so repeated reports generate them once).

    Args:
        patched: the original model carrying the patch as its active PEFT adapter.
        tokenizer: the tokenizer.
        evaluation: ``name -> (kind, prompts)`` (``harmful`` or ``safe``),
            e.g. ``SafetyPatchDataModule.evaluation_sets()``.
        utility: ``Example`` question/answer pairs for the answer loss (may be empty).
        original_cache: the original model's answer cache for ``settings.max_new_tokens``.
        settings: generation length, drift length, batch size.
        gate: a refusal gate fitted on this base model, or ``None``.
        gate_refusal: the fixed refusal measured for flagged prompts (default: the gate's own).
    """
    refusal = gate_refusal or (gate.refusal if gate is not None else None)
    if gate is not None and refusal is None:
        raise ValueError("Pass gate_refusal: this gate lets the patch answer, and the report measures both ways.")
    judge = KeywordRefusalJudge()
    result: dict[str, Any] = {"sets": {}, "judge": judge.name, "max_new_tokens": settings.max_new_tokens}
    for name, (kind, prompts) in evaluation.items():
        with patched.disable_adapter():
            before = [
                a.answer
                for a in cached_greedy_answers(
                    patched,
                    tokenizer,
                    prompts,
                    settings.max_new_tokens,
                    original_cache,
                    settings.batch_size,
                    show_progress=True,
                )
            ]
        after = [
            a.strip()
            for a in generate_responses(patched, tokenizer, prompts, settings.max_new_tokens, settings.batch_size)
        ]
        by_model = {"original": before, "patched": after}
        if gate is not None:
            fired = gate.fires(patched, tokenizer, prompts, settings.batch_size)
            by_model["gated_refusal"] = [refusal if f else b for b, f in zip(before, fired)]
            by_model["gated_patch"] = [a if f else b for b, a, f in zip(before, after, fired)]
        if kind == "harmful":
            entry = {"metric": "harmful", **{k: rate(judge.harmful_flags(prompts, v)) for k, v in by_model.items()}}
        else:
            entry = {"metric": "refusal", **{k: rate(judge.refusal_flags(v)) for k, v in by_model.items()}}
            ids = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
            entry["answer_drift"] = changed_token_fraction(ids(before), ids(after), settings.drift_tokens)
        if gate is not None:
            entry["gate_fired"] = rate(fired)
        entry["kind"] = kind
        entry["examples"] = [
            {"prompt": p, "original": b, "patched": a} for p, b, a in list(zip(prompts, before, after))[:3]
        ]
        result["sets"][name] = entry
    if utility:
        questions, answers = [e.prompt for e in utility], [e.response for e in utility]
        with patched.disable_adapter():
            original_loss = teacher_forced_loss(patched, tokenizer, questions, answers, batch_size=settings.batch_size)
        patched_loss = teacher_forced_loss(patched, tokenizer, questions, answers, batch_size=settings.batch_size)
        result["utility"] = {
            "original_loss": original_loss,
            "patched_loss": patched_loss,
            "relative_change": relative_change(original_loss, patched_loss),
            "n": len(utility),
        }
        if gate is not None:
            gated = gated_utility(patched, tokenizer, questions, answers, gate, settings, original_loss)
            result["utility"].update(gated)
    return result


def gated_utility(
    patched: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    gate: RefusalGate,
    settings: ReportSettings,
    original_loss: float,
) -> dict[str, Any]:
    """The gated model's answer loss: per answer token, the patched model's loss where the gate fires on the
    question, the original model's elsewhere (a fixed refusal has no answer loss: the fired count says how often
    that applies)."""
    fired = gate.fires(patched, tokenizer, questions, settings.batch_size)
    total, count = 0.0, 0
    for on in (True, False):
        chosen = [i for i, f in enumerate(fired) if f == on]
        if not chosen:
            continue
        with nullcontext() if on else patched.disable_adapter():
            for losses in answer_token_losses_by_batch(
                patched, tokenizer, [questions[i] for i in chosen], [answers[i] for i in chosen],
                batch_size=settings.batch_size,
            ):
                total, count = total + float(losses.double().sum()), count + losses.numel()
    # With the gate silent on every question the gated model is the original one: its loss, to the last digit.
    gated_loss = original_loss if not any(fired) else total / count
    return {
        "gated_loss": gated_loss,
        "gated_relative_change": relative_change(original_loss, gated_loss),
        "gate_fired": rate(fired),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: what was trained on, then original versus patched per held-out set.

    Args:
        report: :func:`build_report`'s output.
    """
    lines = [f"# Safety patch: {report['patch']}", "", f"Original model: `{report['model']}`", ""]
    data = report["data"]
    lines += [
        "## Training data",
        "",
        "| role | prompts |",
        "|---|---:|",
        *[f"| {role} | {data[role]} |" for role in ("harmful", "contrast", "harmless", "borderline")],
        *([f"| protected (guard calibration only) | {data['protected']} |"] if data.get("protected") else []),
        "",
        f"Safe prompts dropped because the original model refused them: "
        f"{data['harmless_dropped_refused_by_original'] + data['borderline_dropped_refused_by_original']}; "
        f"refusal phrasings: {data['refusal_phrasings']}; examples: {data['examples']}.",
        "",
    ]
    gate = report.get("gate")
    if gate:
        answer = f"the fixed refusal {gate['refusal']!r}" if gate["respond"] == "refusal" else "the patched model"
        lines += [
            f"Refusal gate (saved beside the patch): layer {gate['layer']}, threshold {gate['threshold']:+g}, "
            f"fitted on {gate['refuse_prompts']} prompts to refuse and {gate['answer_prompts']} to answer; a "
            f"flagged prompt gets {answer}.",
            "",
        ]
    evaluation = report.get("evaluation")
    if evaluation:
        gated = any("gate_fired" in entry for entry in evaluation["sets"].values())
        lines += [
            f"## Held-out evaluation (keyword judge, {evaluation['max_new_tokens']} greedy tokens, 95 "
            "% Wilson intervals)",
            "",
            "| set | n | metric | original % | patched % | answer tokens changed % |"
            + (" gated, fixed refusal % | gated, patch % | gate fired % |" if gated else ""),
            "|---|---:|---|---|---|---:|" + ("---|---|---:|" if gated else ""),
        ]
        for name, entry in evaluation["sets"].items():
            cell = lambda r: f"{r['percent']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"  # noqa: E731
            drift = f"{100 * entry['answer_drift']['tokens']:.1f}" if "answer_drift" in entry else "-"
            lines.append(
                f"| {name} | {entry['patched']['n']} | {entry['metric']} | {cell(entry['original'])} "
                f"| {cell(entry['patched'])} | {drift} |"
                + (
                    f" {cell(entry['gated_refusal'])} | {cell(entry['gated_patch'])} | "
                    f"{entry['gate_fired']['percent']:.1f} |"
                    if gated
                    else ""
                )
            )
        if "utility" in evaluation:
            u = evaluation["utility"]
            lines += [
                "",
                f"Utility answer loss ({u['n']} pairs): original {u['original_loss']:.4f}, patched "
                f"{u['patched_loss']:.4f} ({100 * u['relative_change']:+.2f} %)"
                + (
                    f", gated (patch where the gate fires) {u['gated_loss']:.4f} "
                    f"({100 * u['gated_relative_change']:+.2f} %; the gate fired on {u['gate_fired']['count']} of "
                    f"{u['n']} questions)."
                    if "gated_loss" in u
                    else "."
                ),
            ]
        lines.append("")
    orth = report.get("orthogonality")
    if orth:
        s = orth["summary"]
        lines += [
            "## Orthogonality of the patch to the frozen weights (paper: below 0.1 for LoRA patches)",
            "",
            f"`||V_patch^T V_W||_2` over {s['modules']} modules: mean {s['spectral_mean']:.3f}, median "
            f"{s['spectral_median']:.3f}, max {s['spectral_max']:.3f} (a random subspace's mean squared cosine: "
            f"{s['random_baseline_mean']:.4f}; this patch's: {s['mean_squared_mean']:.4f}).",
            "",
        ]
    return "\n".join(lines)


def build_report(
    module: GuardSpaceLM,
    datamodule: SafetyPatchDataModule,
    patch_dir: Path,
    settings: ReportSettings,
    train_seconds: float,
    gate_settings: GateSettings = GateSettings(),
) -> dict[str, Any]:
    """Load the saved patch onto a fresh original model, fit and save its gate (if enabled) and measure them (see
    the module docstring).

    Args:
        module: the trained module (its hyperparameters name the original model).
        datamodule: the DataModule it was trained on (its training prompts, held-out sets and cache).
        patch_dir: the saved PEFT adapter (the gate is saved into it).
        settings: what to measure.
        train_seconds: how long training took.
        gate_settings: the refusal gate's settings.
    """
    from guardspace_pl.loading import load_causal_lm
    from guardspace_pl.patches import apply_patches

    hp = module.hparams
    report: dict[str, Any] = {
        "patch": str(patch_dir),
        "model": hp.model_name_or_path,
        "data": datamodule.summary,
        "training": {
            "rank": hp.lora_rank,
            "alpha": hp.lora_alpha,
            "learning_rate": hp.learning_rate,
            "target_modules": hp.target_modules,
            "steps": module.trainer.global_step,
            "epochs": module.trainer.current_epoch,
            "seconds": train_seconds,
            "final_train_loss": float(module.trainer.callback_metrics.get("train_loss", float("nan"))),
        },
    }
    if not settings.enabled and not gate_settings.enabled:
        return report
    start = time.perf_counter()
    original = load_causal_lm(
        hp.model_name_or_path, hp.gguf_file, hp.dtype, hp.attn_implementation, hp.trust_remote_code
    )
    if torch.cuda.is_available():
        original = original.to("cuda")
    patched = apply_patches(original, [patch_dir], mode="active")
    tokenizer = datamodule.tokenizer
    gate = None
    refusal = gate_settings.refusal or datamodule.refusals[0]
    if gate_settings.enabled:
        training = datamodule.training_prompts()
        gate = RefusalGate.fit(
            patched,
            tokenizer,
            refuse=training["harmful"] + training["contrast"],
            answer=training["harmless"] + training["borderline"],
            layer=gate_settings.layer,
            threshold=gate_settings.threshold,
            refusal=refusal if gate_settings.respond == "refusal" else None,
            l2=gate_settings.l2,
            batch_size=settings.batch_size,
            show_progress=True,
        )
        gate.metadata["model"] = hp.model_name_or_path
        gate.save(patch_dir)
        report["gate"] = {
            "layer": gate.layer, "threshold": gate.threshold, "respond": gate_settings.respond,
            "refusal": gate.refusal, **gate.metadata,
        }
    if not settings.enabled:
        return report
    weights, factors = patch_factors(patched)
    modules = orthogonality_report(weights, factors)
    report["orthogonality"] = {"summary": summarise_orthogonality(modules), "modules": modules}
    cache = datamodule.answer_cache(settings.max_new_tokens)
    sets = datamodule.evaluation_sets()
    utility = datamodule.utility_examples()
    if sets or utility:
        report["evaluation"] = evaluate_patch(patched, tokenizer, sets, utility, cache, settings, gate, refusal)
    report["report_seconds"] = time.perf_counter() - start
    return report


class AlignCLI(LightningCLI):
    """``fit`` of ``GuardSpaceLM`` on a ``SafetyPatchDataModule``, then the patch's report and merged export."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str,
            default="outputs/safety_patch",
            help="Where the patch, report and merged model go.",
        )
        parser.add_argument(
            "--kind",
            type=Literal["adapter", "merged"],
            default="adapter",
            help="adapter: the PEFT adapter only; merged: also the original model with the patch merged in.",
        )
        parser.add_class_arguments(ReportSettings, "report")
        parser.add_class_arguments(GateSettings, "gate")
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.gguf_file", "data.gguf_file")
        parser.link_arguments("model.dtype", "data.dtype")
        parser.link_arguments(
            "output_dir", "model.adapter_dir", compute_fn=lambda directory: str(Path(directory) / PATCH_SUBDIR)
        )


def run(cli: AlignCLI) -> Optional[dict[str, Any]]:
    """Train, save, measure and (``--kind merged``) export; returns the report on global rank 0.

    Args:
        cli: a parsed :class:`AlignCLI` (``run=False``).
    """
    config = cli.config
    output_dir = Path(config["output_dir"])
    gate_settings = GateSettings(**config["gate"])
    if gate_settings.enabled:
        from guardspace_pl.loading import _load_config, resolve_model_source

        hp = cli.model.hparams
        model_config = _load_config(*resolve_model_source(hp.model_name_or_path, hp.gguf_file), hp.trust_remote_code)
        check_gate_layer(gate_settings, model_config.num_hidden_layers)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_seconds = time.perf_counter() - start
    if cli.trainer.global_rank != 0:
        return None
    patch_dir = Path(cli.model.saved_adapter_dir)
    settings = ReportSettings(**config["report"])
    report = build_report(cli.model, cli.datamodule, patch_dir, settings, train_seconds, gate_settings)
    if config["kind"] == "merged":
        from guardspace_pl.export import export_merged_model

        report["merged"] = str(
            export_merged_model(cli.model, output_dir / MERGED_SUBDIR, tokenizer=cli.datamodule.tokenizer)
        )
    write_json(output_dir / "report.json", report)
    (output_dir / "report.md").write_text(format_report(report))
    print(format_report(report))
    print(f"Safety patch (PEFT adapter): {patch_dir}\nReport: {output_dir / 'report.json'}, {output_dir / 'report.md'}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    """Command line: ``python -m guardspace_pl align --config FILE [--key value ...]``.

    Args:
        argv: the arguments after ``align`` (default: the process's).
    """
    cli = AlignCLI(
        GuardSpaceLM,
        SafetyPatchDataModule,
        run=False,
        args=list(argv) if argv is not None else None,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m guardspace_pl align"},
    )
    return run(cli)


__all__ = [
    "AlignCLI",
    "GateSettings",
    "ReportSettings",
    "build_report",
    "check_gate_layer",
    "evaluate_patch",
    "format_report",
    "gated_utility",
    "main",
    "patch_factors",
    "rate",
    "run",
]
