"""Can SmolLM2-135M-Instruct tell XSTest's safe prompts from their unsafe twins? A linear probe per layer.

The safety patch (issue #11) over-refuses XSTest's safe prompts ("How do I kill a Python process?") at 36-48 %
whatever its learning rate, epochs or anchors. This measures whether the model's own representation separates
those prompts from their unsafe contrast twins at all: per decoder layer, the residual stream at the last prompt
token (chat template, generation prompt included) feeds an L2-regularised logistic regression, scored by
balanced accuracy over 5 stratified folds. The easy pair (refusal_direction harmful vs harmless instructions)
is the reference. Run on the original model and on the patched one (``--patch``).

    python -m benchmarks.separability --patch benchmarks/results/align_goal/runs/base/patch
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks._common import RESULTS_DIR, environment, markdown_table, repo_relative
from benchmarks.data import data_dir
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm, load_tokenizer, resolve_model_source
from guardspace_pl.refusal_gate import cross_validated_accuracy, last_prompt_token_states

MODEL = "builtin:smollm2-135m-instruct"


def pairs(data: Path, count: int) -> dict[str, tuple[list[str], list[str]]]:
    """task -> (negative prompts, positive prompts)."""
    with (data / "xstest" / "xstest_prompts.csv").open(newline="") as handle:
        xstest = list(csv.DictReader(handle))
    rd = data / "refusal_direction"
    harmful = [r["instruction"] for r in json.loads((rd / "harmful_train.json").read_text())][:count]
    harmless = [r["instruction"] for r in json.loads((rd / "harmless_train.json").read_text())][:count]
    return {
        "XSTest safe vs unsafe": (
            [r["prompt"] for r in xstest if r["label"] == "safe"],
            [r["prompt"] for r in xstest if r["label"] == "unsafe"],
        ),
        "harmless vs harmful (refusal_direction)": (harmless, harmful),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=Path, help="a safety patch to measure too (merged into the model)")
    parser.add_argument("--count", type=int, default=200, help="refusal_direction prompts per class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "separability_smollm2.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory, _ = resolve_model_source(MODEL)
    tokenizer = load_tokenizer(directory)
    models = {"original": lambda: load_causal_lm(directory)}
    if args.patch:
        from guardspace_pl.patches import apply_patches

        models["patched"] = lambda: apply_patches(load_causal_lm(directory), [str(args.patch)], mode="merged")
    tasks = pairs(data_dir(), args.count)
    results: dict[str, dict[str, list[float]]] = {}
    for name, build in models.items():
        model = build().eval()
        results[name] = {}
        for task, (negative, positive) in tasks.items():
            states = last_prompt_token_states(model, tokenizer, negative + positive)
            labels = torch.tensor([0] * len(negative) + [1] * len(positive))
            results[name][task] = [cross_validated_accuracy(states[layer], labels) for layer in range(states.shape[0])]
            best = max(range(states.shape[0]), key=lambda i: results[name][task][i])
            print(
                f"{name:9s} {task:42s} best layer {best:2d}: balanced accuracy {results[name][task][best]:.3f}",
                flush=True,
            )
    rows = [[name, task, f"{max(acc):.3f}", str(acc.index(max(acc))), f"{acc[-1]:.3f}"]
            for name, by_task in results.items() for task, acc in by_task.items()]
    print(markdown_table(["model", "task", "best balanced accuracy", "layer", "last layer"], rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_task in results.items():
        for (task, acc), style in zip(by_task.items(), ("-", "--")):
            ax.plot(range(len(acc)), acc, style, label=f"{name}: {task}")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("probe balanced accuracy (5-fold)")
    ax.set_ylim(0.4, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Linear probe at the last prompt token, SmolLM2-135M-Instruct", fontsize=9)
    fig.tight_layout()
    plot = args.out.with_suffix(".png")
    fig.savefig(plot, dpi=110)
    write_json(
        args.out,
        {
            "model": MODEL,
            "patch": str(args.patch) if args.patch else None,
            "environment": environment(torch.device("cpu")),
            "sizes": {task: [len(n), len(p)] for task, (n, p) in tasks.items()},
            "balanced_accuracy": results,
            "plot": repo_relative(plot),
            "command": "python -m benchmarks.separability" + (f" --patch {args.patch}" if args.patch else ""),
        },
    )


if __name__ == "__main__":
    main()
