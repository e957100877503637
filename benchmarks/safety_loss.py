"""The response-only loss with and without the prompt positions' logits, on the real model.

``SafetyGradientProjection`` differentiates the refusal loss of its safety samples every refresh, and
``GuardSpaceLM`` trains on responses to prompts; both compute logits only from the last prompt position on
(``guardspace_pl.losses.response_loss``). This times one forward + backward of a LoRA model with Hugging Face's
``labels=`` loss (logits at every position) against it, interleaved, on SmolLM2-135M-Instruct (49k vocabulary).

    OMP_NUM_THREADS=1 python -m benchmarks.safety_loss --threads 1                   # SPF's safety sample
    OMP_NUM_THREADS=1 python -m benchmarks.safety_loss --threads 1 --batch 4 --tokens 192 --labelled 96 \
        --repeats 5 --out benchmarks/results/safety_loss_training_smollm2.json     # a training batch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from peft import LoraConfig, get_peft_model

from benchmarks._common import (
    LLAMA_LINEAR_INPUT,
    RESULTS_DIR,
    PeakMemory,
    markdown_table,
    mib,
    repo_relative,
    start_run,
)
from guardspace_pl.io import write_json
from guardspace_pl.loading import load_causal_lm
from guardspace_pl.losses import response_loss

MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="a causal LM (name, path or builtin:)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per pass (1: SPF's safety sample)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per sequence")
    parser.add_argument("--labelled", type=int, default=24, help="the last tokens carrying the loss (the response)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on the seven projections")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per design (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default=str(RESULTS_DIR / "safety_loss_smollm2.json"), help="JSON output")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, env = start_run(args)
    if not 0 < args.labelled < args.tokens:
        raise SystemExit("--labelled must be between 1 and --tokens - 1 (a prompt, then the labelled refusal).")
    model = load_causal_lm(args.model)
    lora = LoraConfig(r=args.rank, target_modules=list(LLAMA_LINEAR_INPUT), init_lora_weights=False)
    model = get_peft_model(model, lora).to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, : args.tokens - args.labelled] = -100

    designs: dict[str, Callable[[], Any]] = {
        "labels= loss (logits at every position)": lambda: model(input_ids=ids, labels=labels).loss,
        "response_loss (logits from the last prompt position)": lambda: response_loss(model, ids, labels),
    }
    times: dict[str, list[float]] = {name: [] for name in designs}
    peaks: dict[str, int] = {}
    for loss in designs.values():  # warm-up: the first pass allocates what every later pass reuses
        torch.autograd.grad(loss(), params)
    for name, loss in designs.items():  # the peak memory a pass adds (untimed: the sampler competes)
        with PeakMemory(device) as memory:
            torch.autograd.grad(loss(), params)
        peaks[name] = memory.delta_bytes
    for _ in range(args.repeats):
        for name, loss in designs.items():
            start = time.perf_counter()
            torch.autograd.grad(loss(), params)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = next(iter(medians.values()))
    rows = [
        [name, f"{m * 1e3:.1f}", f"{m / baseline:.3f}x", f"{mib(peaks[name]):.0f}"] for name, m in medians.items()
    ]
    headers = ["loss", "forward + backward ms (median)", "vs labels= loss", "peak MiB added by a pass"]
    print(markdown_table(headers, rows))
    payload = {
        "benchmark": "safety_loss",
        "command": "python -m benchmarks.safety_loss " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "vocabulary": vocab,
        "seconds": times,
        "median_seconds": medians,
        "peak_bytes_added": peaks,
        "environment": env,
    }
    path = write_json(args.out, payload)
    print(f"\nWrote {repo_relative(path)}")
    return payload


if __name__ == "__main__":
    main()
