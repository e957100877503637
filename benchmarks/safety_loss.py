"""SPF's safety pass with and without the prompt positions' logits, on the real model.

``SafetyGradientProjection`` differentiates the refusal loss of its safety samples every refresh. The callback's
loss (``guardspace_pl.losses.response_loss``) computes logits only from the last prompt position on; this times
one forward + backward of a LoRA model with Hugging Face's ``labels=`` loss (logits at every position) against it,
interleaved, on SmolLM2-135M-Instruct (49k-token vocabulary).

    OMP_NUM_THREADS=1 python -m benchmarks.safety_loss --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from peft import LoraConfig, get_peft_model

from benchmarks._common import RESULTS_DIR, environment, markdown_table, repo_relative
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm
from guardspace_pl.losses import response_loss

MODEL = "builtin:smollm2-135m-instruct"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="a causal LM (name, path or builtin:)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens of the safety sequence")
    parser.add_argument("--labelled", type=int, default=24, help="its last tokens carrying the loss (the refusal)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on the seven projections")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per design (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "safety_loss_smollm2.json"), help="JSON output")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not 0 < args.labelled < args.tokens:
        raise SystemExit("--labelled must be between 1 and --tokens - 1 (a prompt, then the labelled refusal).")
    model = load_causal_lm(args.model)
    lora = LoraConfig(r=args.rank, target_modules=PROJECTIONS, init_lora_weights=False)
    model = get_peft_model(model, lora).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : args.tokens - args.labelled] = -100

    designs: dict[str, Callable[[], Any]] = {
        "labels= loss (logits at every position)": lambda: model(input_ids=ids, labels=labels).loss,
        "response_loss (logits from the last prompt position)": lambda: response_loss(model, ids, labels),
    }
    times: dict[str, list[float]] = {name: [] for name in designs}
    for loss in designs.values():  # warm-up
        torch.autograd.grad(loss(), params)
    for _ in range(args.repeats):
        for name, loss in designs.items():
            start = time.perf_counter()
            torch.autograd.grad(loss(), params)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = next(iter(medians.values()))
    rows = [[name, f"{m * 1e3:.1f}", f"{m / baseline:.3f}x"] for name, m in medians.items()]
    print(markdown_table(["safety loss", "forward + backward ms (median)", "vs labels= loss"], rows))
    payload = {
        "benchmark": "safety_loss",
        "command": "python -m benchmarks.safety_loss " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "vocabulary": vocab,
        "seconds": times,
        "median_seconds": medians,
        "environment": environment(torch.device("cpu")),
    }
    path = write_json(args.out, payload)
    print(f"\nWrote {repo_relative(path)}")
    return payload


if __name__ == "__main__":
    main()
