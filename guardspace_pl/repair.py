"""``python -m guardspace_pl repair --method safelora|lssf|...``: restore safety to an already fine-tuned model,
post hoc.

Input: a Lightning checkpoint of a ``GuardSpaceLM`` run (``--checkpoint``, a ``.ckpt`` file or an FSDP2 sharded
directory) or a PEFT LoRA adapter on its base model (``--adapter DIR --base MODEL``). The method acts on the
model's LoRA layers in place; the result is written through ``guardspace_pl.export``: a standard PEFT adapter
relative to the ORIGINAL base (``--kind adapter``) or a merged model (``--kind merged``). A JSON report of what
the method did goes to ``<out>/repair_report.json``.

Methods are entries of ``METHODS`` (see :class:`RepairMethod`): a method adds its own flags and applies itself to
a :class:`RepairContext`. Adding one is ``register_method(RepairMethod(...))`` in this module.

Example::

    python -m guardspace_pl repair --method safelora --adapter my_adapter/ --base builtin:smollm2-135m-instruct \\
        --reference-adapter safety_patch/ --out repaired/ --kind adapter --mode number --k 10
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from guardspace_pl.lora import LoraTarget
from guardspace_pl.safety_reference import SafetyReference

log = logging.getLogger(__name__)

REPORT_FILENAME = "repair_report.json"


@dataclass
class RepairContext:
    """What a repair method gets: the loaded model, its LoRA layers, the safety reference and the command line.

    Args:
        args: the parsed command line (the method's own flags included).
        model: the module holding the ``PeftModel`` (a ``GuardSpaceLM`` for ``--checkpoint``, a ``PeftModel`` for
            ``--adapter``); methods modify its LoRA layers (or frozen weights) in place.
        targets: the plain LoRA layers of ``model`` (DoRA and other variants already rejected).
        reference: the safety reference from ``--reference-*`` (None for a method that needs none).
        base: the original base model's name or path (what the exported adapter is relative to).
        extra: values a method adds to the top level of ``repair_report.json``.
    """

    args: argparse.Namespace
    model: nn.Module
    targets: list[LoraTarget]
    reference: Optional[SafetyReference]
    base: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RepairMethod:
    """One ``--method`` of the repair command.

    Args:
        name: the ``--method`` value.
        help: one line for ``--help``.
        add_arguments: adds the method's own flags to its argparse group (prefix-free names that do not clash with
            other methods' flags).
        check_arguments: validates the method's flags BEFORE anything is loaded; raise ``ValueError`` with the fix.
        apply: modifies ``context.model`` in place and returns a JSON-serialisable report.
        needs_reference: whether ``--reference-adapter`` or ``--reference-base/--reference-aligned`` is required.
        changes_base_weights: whether the method writes the frozen base weights (then ``--adapter`` input is
            exported relative to a freshly loaded original base, at rank ``2r``; otherwise the adapter is saved as is).
        export_adapter: writes ``--kind adapter`` output itself and returns its directory, for a method whose update
            does not fit the default export (``export_peft_adapter`` re-factors at rank ``2r``); None: the default.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    check_arguments: Callable[[argparse.Namespace], None]
    apply: Callable[[RepairContext], dict[str, Any]]
    needs_reference: bool = True
    changes_base_weights: bool = False
    export_adapter: Optional[Callable[[RepairContext], Path]] = None


#: ``--method`` name -> method
METHODS: dict[str, RepairMethod] = {}


def register_method(method: RepairMethod) -> None:
    """Make ``method`` available as ``--method <method.name>``.

    Args:
        method: the method to add; its name must be new.
    """
    if method.name in METHODS:
        raise ValueError(f"A repair method named {method.name!r} is already registered.")
    METHODS[method.name] = method


# ---------------------------------------------------------------------------------------------- SafeLoRA
def _safelora_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--mode", choices=("number", "threshold"), default="number",
        help="number: project the K modules of lowest cosine(C B A, B A) (paper default); threshold: those with "
        "cosine <= tau.",
    )
    group.add_argument(
        "--k", type=int, default=10,
        help="K, modules projected in number mode (paper: 10; at most the number of covered LoRA layers).",
    )
    group.add_argument(
        "--threshold", type=float, default=0.5,
        help="tau in [-1, 1], the cosine cut-off of threshold mode (paper: 0.5).",
    )
    group.add_argument(
        "--projector", choices=("faithful", "orthonormal"), default="faithful",
        help="faithful: B <- C B with C = V V^T/||V||_F (paper); orthonormal: B <- U U^T B onto the column space of V "
        "(a choice).",
    )
    group.add_argument(
        "--compute-dtype", choices=("float32", "float64"), default="float32",
        help="dtype of the SafeLoRA computation (official: float32).",
    )


def _safelora_check(args: argparse.Namespace) -> None:
    from guardspace_pl.safelora import check_safelora_settings

    check_safelora_settings(args.mode, args.k, args.threshold, args.projector, args.compute_dtype)


def _safelora_apply(context: RepairContext) -> dict[str, Any]:
    from guardspace_pl.safelora import apply_safelora

    args = context.args
    report = apply_safelora(
        context.targets, context.reference, args.mode, args.k, args.threshold, args.projector, args.compute_dtype
    )
    log.info(report.summary())
    return report.to_dict()


register_method(
    RepairMethod(
        name="safelora",
        help="SafeLoRA (Hsu et al., NeurIPS 2024): project the least safety-aligned LoRA updates onto the alignment "
        "subspace.",
        add_arguments=_safelora_arguments,
        check_arguments=_safelora_check,
        apply=_safelora_apply,
    )
)


# ------------------------------------------------------------------------------------------------- LSSF
def _lssf_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--alpha", type=float, default=1.0,
        help="fusion strength alpha >= 0 in W_ft + alpha P' delta_safe (a choice: 1; paper sweep 0.5-2).",
    )
    group.add_argument(
        "--eta", type=float, default=0.9,
        help="entropy share in (0, 1] fixing each layer's rank r_l (a choice: 0.9; sweep 0.8-0.95).",
    )
    group.add_argument(
        "--a1", type=float, default=1.0,
        help="weight > 0 of the top safety direction in the weighted projector P' (a choice: 1 = plain projector).",
    )
    group.add_argument(
        "--anchor-prompts",
        help="harmful anchor prompts (required for lssf): builtin:harmbench, builtin:donotanswer, a local file, or "
        "hub:ID.",
    )
    group.add_argument(
        "--anchor-count", type=int, default=128, help="how many anchor prompts to use (paper: 128, robust 16-512)."
    )
    group.add_argument(
        "--anchor-max-new-tokens", type=int, default=64,
        help="length limit of the refusals the aligned model generates for the anchors (a choice).",
    )
    group.add_argument(
        "--anchor-batch-size", type=int, default=8, help="prompts per generation/forward batch for the anchors."
    )
    group.add_argument(
        "--anchor-prompt-format", choices=("chat_template", "raw"), default="chat_template",
        help="how anchor prompts are shown to the model (chat_template: a user turn plus the assistant header).",
    )


def _lssf_check(args: argparse.Namespace) -> None:
    from guardspace_pl.lssf import check_lssf_settings

    check_lssf_settings(args.alpha, args.eta, args.a1)
    if not args.anchor_prompts:
        raise ValueError("--method lssf needs --anchor-prompts SOURCE (harmful prompts, e.g. builtin:harmbench).")
    for flag, value in (
        ("--anchor-count", args.anchor_count),
        ("--anchor-max-new-tokens", args.anchor_max_new_tokens),
        ("--anchor-batch-size", args.anchor_batch_size),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")


def _lssf_apply(context: RepairContext) -> dict[str, Any]:
    from guardspace_pl.callbacks.base import find_causal_lm
    from guardspace_pl.datamodules.sources import load_prompts
    from guardspace_pl.loading import load_tokenizer
    from guardspace_pl.lssf import fuse_lssf_by_block

    args = context.args
    prompts = load_prompts(args.anchor_prompts)[: args.anchor_count]
    if not prompts:
        raise ValueError(f"--anchor-prompts {args.anchor_prompts} gave no prompts: LSSF needs harmful anchor prompts.")
    tokenizer = getattr(context.model, "tokenizer", None) or load_tokenizer(context.base)
    report, _ = fuse_lssf_by_block(  # one decoder block's anchor covariances in memory at a time
        find_causal_lm(context.model), context.targets, context.reference, tokenizer, prompts, args.alpha, args.eta,
        args.a1, max_new_tokens=args.anchor_max_new_tokens, batch_size=args.anchor_batch_size,
        prompt_format=args.anchor_prompt_format,
    )
    context.extra["lssf_fold_ranks"] = report.fold_ranks()
    log.info(report.summary())
    return report.to_dict()


def _lssf_export_adapter(context: RepairContext) -> Path:
    """The folded ``alpha P' delta`` raises each layer's update beyond rank ``2r``: export with that much more rank."""
    from guardspace_pl.export import export_peft_adapter
    from guardspace_pl.loading import load_causal_lm

    args, module = context.args, context.model
    if args.checkpoint is not None:
        hp = module.hparams
        gguf = hp.gguf_file if context.base == hp.model_name_or_path else None
        original = load_causal_lm(context.base, gguf, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
    else:
        original = load_causal_lm(context.base, dtype=args.dtype)
    return export_peft_adapter(module, original, args.out, extra_ranks=context.extra["lssf_fold_ranks"]).directory


register_method(
    RepairMethod(
        name="lssf",
        help="LSSF (Zhou et al., ACL 2025): fold the safety vector projected onto each layer's activation-weighted "
        "safety subspace.",
        add_arguments=_lssf_arguments,
        check_arguments=_lssf_check,
        apply=_lssf_apply,
        changes_base_weights=True,
        export_adapter=_lssf_export_adapter,
    )
)


# -------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The repair command's parser: shared flags, then one group of flags per registered method."""
    parser = argparse.ArgumentParser(
        prog="python -m guardspace_pl repair",
        description=(
            "Restore safety to an already fine-tuned model (a GuardSpaceLM checkpoint or a PEFT LoRA adapter) with a "
            "post-hoc method, and write the result as a standard PEFT adapter on the original base or a merged model."
        ),
    )
    parser.add_argument(
        "--method", required=True, choices=sorted(METHODS),
        help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()),
    )
    source = parser.add_argument_group("fine-tuned model (one of --checkpoint, --adapter)")
    source.add_argument(
        "--checkpoint",
        help="Lightning checkpoint of a GuardSpaceLM run: a .ckpt file or an FSDP2 sharded checkpoint directory.",
    )
    source.add_argument(
        "--adapter",
        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors); needs --base.",
    )
    source.add_argument(
        "--base",
        help="original base model (hub id, directory or builtin:NAME): what --adapter was trained on, and what the "
        "exported adapter is relative to (default for --checkpoint: its model_name_or_path).",
    )
    source.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="dtype to load --base in (--adapter input).",
    )
    reference = parser.add_argument_group("safety reference (V = W_aligned - W_base per module)")
    reference.add_argument(
        "--reference-adapter",
        help="a LoRA safety-patch adapter directory: V = s B A of the patch (kept factored).",
    )
    reference.add_argument(
        "--reference-base",
        help="base checkpoint directory (safetensors) of the base/aligned pair; needs --reference-aligned.",
    )
    reference.add_argument(
        "--reference-aligned",
        help="aligned checkpoint directory (safetensors), same architecture as --reference-base.",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", required=True, help=f"output directory (the adapter or merged model, plus {REPORT_FILENAME})."
    )
    output.add_argument(
        "--kind", required=True, choices=("adapter", "merged"),
        help="adapter: a standard PEFT LoRA adapter relative to the ORIGINAL base; merged: a full model with the "
        "update merged in.",
    )
    for method in METHODS.values():
        method.add_arguments(parser.add_argument_group(f"{method.name} options (--method {method.name})"))
    return parser


def check_arguments(args: argparse.Namespace) -> RepairMethod:
    """Validate the command line before anything is loaded; returns the chosen method.

    Args:
        args: the parsed command line.
    """
    method = METHODS[args.method]
    if (args.checkpoint is None) == (args.adapter is None):
        raise ValueError("Pass exactly one fine-tuned model: --checkpoint X.ckpt, or --adapter DIR with --base MODEL.")
    if args.adapter is not None:
        if args.base is None:
            raise ValueError("--adapter needs --base: the base model the adapter was trained on.")
        _check_lora_adapter_dir(Path(args.adapter))
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"Checkpoint {args.checkpoint} does not exist.")
    has_patch = args.reference_adapter is not None
    has_pair = args.reference_base is not None or args.reference_aligned is not None
    if method.needs_reference:
        if has_patch == has_pair:
            raise ValueError(
                f"--method {method.name} needs one safety reference: --reference-adapter PATCH_DIR, or "
                "--reference-base BASE_DIR with --reference-aligned ALIGNED_DIR."
            )
        if has_pair and (args.reference_base is None or args.reference_aligned is None):
            raise ValueError("--reference-base and --reference-aligned go together (V = W_aligned - W_base).")
    method.check_arguments(args)
    return method


def _check_lora_adapter_dir(directory: Path) -> None:
    config = directory / "adapter_config.json"
    if not config.exists():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (no adapter_config.json).")
    peft_type = json.loads(config.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{directory} is a {peft_type} adapter, not LoRA: it has no LoRA layers to repair.")


def load_reference(args: argparse.Namespace) -> Optional[SafetyReference]:
    """The safety reference named on the command line (headers only for checkpoints), or None.

    Args:
        args: the parsed command line.
    """
    if args.reference_adapter is not None:
        return SafetyReference.from_patch_adapter(args.reference_adapter)
    if args.reference_base is not None:
        return SafetyReference.from_checkpoints(args.reference_base, args.reference_aligned)
    return None


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The fine-tuned model and the name of its original base.

    Args:
        args: the parsed command line.
    """
    if args.checkpoint is not None:
        from guardspace_pl.export import load_checkpoint_module

        module = load_checkpoint_module(args.checkpoint)
        return module, args.base or module.hparams.model_name_or_path
    from peft import PeftModel

    from guardspace_pl.loading import load_causal_lm

    base = load_causal_lm(args.base, dtype=args.dtype)
    return PeftModel.from_pretrained(base, args.adapter, is_trainable=False), args.base


def export(context: RepairContext, method: RepairMethod) -> Path:
    """Write the repaired model to ``--out`` as ``--kind`` says.

    Args:
        context: the repaired model and the command line.
        method: the method that was applied.
    """
    from guardspace_pl.export import export_merged_model, export_peft_adapter

    args, module = context.args, context.model
    if args.kind == "merged":
        return export_merged_model(module, args.out, tokenizer=_tokenizer(args, module))
    if method.export_adapter is not None:
        return method.export_adapter(context)
    if args.adapter is not None and not method.changes_base_weights:
        # Only LoRA factors changed and the base is the original: the adapter keeps its rank and config.
        module.save_pretrained(args.out)
        return Path(args.out)
    from guardspace_pl.loading import load_causal_lm

    if args.checkpoint is not None:
        hp = module.hparams
        gguf = hp.gguf_file if context.base == hp.model_name_or_path else None
        original = load_causal_lm(context.base, gguf, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
    else:
        original = load_causal_lm(context.base, dtype=args.dtype)
    return export_peft_adapter(module, original, args.out).directory


def _tokenizer(args: argparse.Namespace, module: nn.Module):
    if args.checkpoint is not None:
        return None  # export_merged_model takes the GuardSpaceLM's own
    from guardspace_pl.loading import load_tokenizer

    try:
        return load_tokenizer(args.base)
    except (OSError, ValueError) as error:
        log.warning("No tokenizer saved with the merged model: %s", error)
        return None


def repair(args: argparse.Namespace) -> dict[str, Any]:
    """Check, load, apply the method, export; returns the report (also written to ``<out>/repair_report.json``).

    Args:
        args: the parsed command line.
    """
    from guardspace_pl.callbacks.base import check_plain_lora
    from guardspace_pl.io import write_json
    from guardspace_pl.lora import find_lora_targets

    method = check_arguments(args)
    reference = load_reference(args) if method.needs_reference else None
    model, base = load_model(args)
    targets = find_lora_targets(model)
    for target in targets:
        check_plain_lora(target, f"repair --method {method.name}")
    context = RepairContext(args=args, model=model, targets=targets, reference=reference, base=base)
    method_report = method.apply(context)
    out = export(context, method)
    report = {
        "method": method.name,
        "source": args.checkpoint or args.adapter,
        "base": base,
        "reference": reference.source if reference is not None else None,
        "kind": args.kind,
        "out": str(out),
        **context.extra,
        "report": method_report,
    }
    write_json(Path(args.out) / REPORT_FILENAME, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point; user errors exit with status 2 and a one-line message.

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = repair(args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    summary = {k: report[k] for k in ("method", "kind", "out")}
    method_report = report["report"]
    if isinstance(method_report, dict) and "num_projected" in method_report:
        summary["num_projected"] = method_report["num_projected"]
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    main()
