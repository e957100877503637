"""``python -m guardspace_pl fit|validate|test --config configs/<x>.yaml`` (LightningCLI)."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LightningCLI

from guardspace_pl.datamodules import GuardSpaceDataModule
from guardspace_pl.model import GuardSpaceLM

#: Model arguments that say how to evaluate, not what was trained: on ``test --ckpt_path``, this command's values
#: win over the checkpoint's (LightningCLI otherwise lets the checkpoint's hyperparameters override them).
EVALUATION_ARGUMENTS = ("eval_max_new_tokens", "judge", "judge_model", "results_path")


class GuardSpaceCLI(LightningCLI):
    """LightningCLI whose DataModule reads the model's tokenizer, and which reports what a run produced.

    ``test`` runs the generation-based evaluation (harmful score, over-refusal, GSM8K accuracy) over the
    DataModule's evaluation sets and writes ``results.json``; with ``--ckpt_path`` it evaluates trained weights,
    under the evaluation settings of this command line (``EVALUATION_ARGUMENTS``), not the checkpoint's.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.gguf_file", "data.tokenizer_gguf_file")
        parser.add_argument(
            "--demo_prompt", type=Optional[str], default=None, help="Generate a reply to this prompt after fit."
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        model = self.config.get(f"{subcommand}.model") if subcommand else None
        keep = {name: model.get(name) for name in EVALUATION_ARGUMENTS} if model is not None else {}
        super()._parse_ckpt_path()
        for name, value in keep.items():
            self.config[f"{subcommand}.model.{name}"] = value

    def after_fit(self) -> None:
        model = self.model
        if self.trainer.global_rank != 0:
            return
        loss = self.trainer.callback_metrics.get("train_loss")
        lines = ["", "=" * 72, "Fit finished."]
        if model.saved_adapter_dir:
            lines.append(f"  adapter saved to : {model.saved_adapter_dir}")
        if loss is not None:
            lines.append(f"  final train loss : {float(loss):.4f}")
        prompt = self.config[self.subcommand].get("demo_prompt")
        if prompt:
            reply = model.generate_text([prompt], max_new_tokens=40)[0]
            lines += [f"  prompt           : {prompt}", f"  reply            : {reply.strip()}"]
        lines.append("=" * 72)
        print("\n".join(lines))


#: Subcommands beside Lightning's fit/validate/test: name -> module whose ``main(argv)`` runs it.
EXTRA_SUBCOMMANDS = {
    "demo": "guardspace_pl.demo",  # the embedded demo: safety patch, poisoned fine-tune with LoRA vs the method
    "align": "guardspace_pl.align",  # train a LoRA safety patch on safety data only (LightningCLI conventions)
    "repair": "guardspace_pl.repair",  # SafeLoRA / LSSF on an already fine-tuned checkpoint or adapter
}


def main(args: Optional[list[str]] = None) -> None:
    """``python -m guardspace_pl SUBCOMMAND ...``: Lightning's ``fit``/``validate``/``test``, plus ``align`` and
    ``repair``.

    Args:
        args: the command line without the program name (default: ``sys.argv[1:]``).
    """
    import importlib
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        if args is None:
            sys.argv = [sys.argv[0], *argv[1:]]  # the subcommand's own parser reads the rest, as if run alone
        importlib.import_module(EXTRA_SUBCOMMANDS[argv[0]]).main(None if args is None else argv[1:])
        return
    more = ", ".join(f"{name} (--help for its options)" for name in EXTRA_SUBCOMMANDS)
    GuardSpaceCLI(
        GuardSpaceLM,
        GuardSpaceDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": f"More subcommands: {more}."},
    )


if __name__ == "__main__":
    main()
