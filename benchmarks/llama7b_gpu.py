"""GuardSpace on a Llama-2-7B-shaped model on one GPU: set-up cost and training-step cost against plain LoRA.

One run, one model (random weights, bf16 base, PEFT LoRA r = 128 on q, k, v, o, gate, up and down, sequence
512), two measurements:

1. **Set-up**: ``SafetySubspaceInit`` and ``NullSpaceProjection`` exactly as users run them, in a real
   Lightning ``Trainer.fit`` on a plain LightningModule: calibration forwards, covariances, the
   preconditioned SVD of every adapted weight, the adapter and residual writes, and the null-space
   projectors. Wall time and peak memory of each callback's part of ``on_fit_start``.
2. **Training step** (forward + backward + AdamW) of plain LoRA, GuardSpace with the projectors the set-up
   just built, GuardSpace with random bases at null fraction 0.5 (the costliest case of a low-rank basis:
   ``min(d, n - d)`` columns), and the official code's dense ``n x n`` ``P`` in the forward pass, taking
   turns step by step (``benchmarks/step_overhead.py`` does the timing). Ratios to LoRA, tokens/s and
   model-FLOPs utilisation.

Model FLOPs per trained token: ``4 N + 12 L S H`` with ``N`` the base model's matrix parameters (forward
``2N``; backward ``2N`` for the input gradients only, since the base is frozen; LoRA's few FLOPs are left
out) and the attention term of PaLM's formula (``QK^T`` and ``AV``, forward and backward). MFU divides by
the GPU's dense bf16 peak (``--peak-tflops``; known H100/H200 values are filled in).

Goals (issue #6): whole set-up under 60 s, GuardSpace step <= 1.03x LoRA, projectors <= 25% of weights.

    python -m benchmarks.llama7b_gpu                      # llama7b on a GPU, the cpu smoke shape otherwise
    python -m benchmarks.llama7b_gpu --profile cpu --threads 1
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from benchmarks import step_overhead as steps
from benchmarks._common import (
    PeakMemory,
    add_shape_arguments,
    benchmark_parser,
    describe_machine,
    finish_run,
    heap_reuse,
    markdown_table,
    memory_method,
    mib,
    release_memory,
    start_run,
    synchronize,
)
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.null_space import NullSpaceProjector
from guardspace_pl.testing import byte_tokenizer

GOALS = {"setup_seconds": 60.0, "step_ratio": 1.03, "projector_percent_of_weights": 25.0}
#: dense bf16 peak TFLOP/s (no sparsity) by a substring of ``torch.cuda.get_device_name``
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Profile:
    setup: steps.Setup
    calibration_prompts: int
    calibration_tokens: int
    calibration_batch: int


PROFILES: dict[str, Profile] = {
    # AdvBench's 520 prompts, a chat template's worth of tokens each.
    "llama7b": Profile(steps.PROFILES["llama7b"], calibration_prompts=520, calibration_tokens=64, calibration_batch=16),
    "cpu": Profile(steps.PROFILES["cpu"], calibration_prompts=64, calibration_tokens=32, calibration_batch=16),
}


def calibration_prompts(count: int, tokens: int, seed: int) -> list[str]:
    """Random lower-case text of exactly ``tokens`` characters: one token each under the byte tokenizer."""
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(tokens)) for _ in range(count)]


class AnyCausalLM(pl.LightningModule):
    """A user's own LightningModule around a PEFT model: the callbacks need nothing more."""

    def __init__(self, model: nn.Module, input_ids: Tensor) -> None:
        super().__init__()
        self.model = model
        self.input_ids = input_ids

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-5)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.input_ids], batch_size=None)  # the one prepared batch


class Stopwatch(Callback):
    """Marks a point in ``on_fit_start``: put one before, between and after the GuardSpace callbacks."""

    def __init__(self, name: str, marks: dict[str, float], memory: PeakMemory, role: str) -> None:
        self.name, self.marks, self.memory, self.role = name, marks, memory, role

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        if self.role == "stop":
            self.memory.__exit__(None, None, None)
        self.marks[self.name] = time.perf_counter()
        if self.role == "start":
            self.memory.__enter__()


def run_setup(
    model: nn.Module, input_ids: Tensor, profile: Profile, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], dict[str, NullSpaceProjector]]:
    """One ``Trainer.fit`` step with both callbacks, timed and watched from inside ``on_fit_start``."""
    tokenizer = byte_tokenizer()
    prompts = calibration_prompts(profile.calibration_prompts, profile.calibration_tokens, args.seed)
    subspace = SafetySubspaceInit(
        prompts, tokenizer, prompt_format="raw", batch_size=profile.calibration_batch, progress_bar=False
    )
    null_space = NullSpaceProjection(
        prompts,
        tokenizer,
        prompt_format="raw",
        threshold=args.threshold,
        batch_size=profile.calibration_batch,
        progress_bar=False,
    )
    marks: dict[str, float] = {}
    memory = PeakMemory(device)
    callbacks = [
        Stopwatch("start", marks, memory, "start"), subspace, Stopwatch("subspace_done", marks, memory, "mark"),
        null_space, Stopwatch("null_space_done", marks, memory, "stop"),
    ]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=1,
            precision="bf16-mixed" if profile.setup.autocast else "32-true",
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(module := AnyCausalLM(model, input_ids))
    null_dims = [(row["null_dim"], row["in_features"]) for row in null_space.report]
    result = {
        "subspace_init_seconds": marks["subspace_done"] - marks["start"],
        "null_space_seconds": marks["null_space_done"] - marks["subspace_done"],
        "setup_seconds": marks["null_space_done"] - marks["start"],
        "setup_peak_bytes": memory.peak_bytes,
        "setup_added_bytes": memory.delta_bytes,
        "calibration_tokens": profile.calibration_prompts * profile.calibration_tokens,
        "null_fraction_median": sorted(d / n for d, n in null_dims)[len(null_dims) // 2],
        "null_fraction_range": [min(d / n for d, n in null_dims), max(d / n for d, n in null_dims)],
    }
    # The callback names layers from the LightningModule down, the timing code from the PEFT model down.
    pairs = zip(find_lora_targets(model), find_lora_targets(module), strict=True)
    projectors = {steps.input_key(bare): null_space.projector(wrapped) for bare, wrapped in pairs}
    return result, projectors


def matrix_parameters(model: nn.Module) -> int:
    """Parameters of the base model's matrices (embedding lookups excluded, LM head included): ``N`` of ``4 N``."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            total += module.weight.numel()
    return total


def flops_per_token(model: nn.Module, setup: steps.Setup) -> float:
    return 4.0 * matrix_parameters(model) + 12.0 * setup.layers * setup.seq * setup.hidden


def peak_tflops(device: torch.device, override_value: Optional[float]) -> Optional[float]:
    if override_value is not None:
        return override_value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def goal(value: float, relation: str, limit: float) -> dict[str, Any]:
    """``{"value", "goal", "met"}`` for one of the issue's goals; ``relation`` is ``"<"`` or ``"<="``."""
    met = value < limit if relation == "<" else value <= limit
    return {"value": value, "goal": f"{relation} {limit:g}", "met": met}


def render(
    setup_result: dict[str, Any], rows: Sequence[dict[str, Any]], weights: dict[str, int], goals: dict[str, Any]
) -> str:
    setup_table = markdown_table(
        ["phase", "seconds", "peak MiB", "added MiB"],
        [
            [
                "SafetySubspaceInit (calibration + SVDs + writes)",
                f"{setup_result['subspace_init_seconds']:.2f}",
                "",
                "",
            ],
            ["NullSpaceProjection (calibration + projectors)", f"{setup_result['null_space_seconds']:.2f}", "", ""],
            [
                "whole set-up",
                f"{setup_result['setup_seconds']:.2f}",
                f"{mib(setup_result['setup_peak_bytes']):.0f}",
                f"{mib(setup_result['setup_added_bytes']):.0f}",
            ],
        ],
    )
    step_table = markdown_table(
        [
            "design",
            "step ms",
            "vs LoRA",
            "tokens/s",
            "MFU",
            "peak MiB",
            "peak vs LoRA",
            "projector MiB",
            "% of weights",
        ],
        [
            [
                r["design"],
                f"{1e3 * r['median_step_s']:.1f}",
                f"{r['time_ratio_vs_lora']:.3f}x",
                f"{r['tokens_per_s']:.0f}",
                f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
                f"{mib(r['peak_bytes']):.0f}",
                f"{r['peak_ratio_vs_lora']:.3f}x",
                f"{mib(r['projector_bytes']):.1f}",
                f"{r['projector_percent_of_base_weights']:.1f}%",
            ]
            for r in rows
        ],
    )
    goal_lines = "\n".join(
        f"- {name}: {g['value']:.3g} (goal {g['goal']}) {'met' if g['met'] else 'NOT met'}"
        for name, g in goals.items()
    )
    return (
        f"## Set-up ({setup_result['calibration_tokens']} calibration tokens; null fraction median "
        f"{setup_result['null_fraction_median']:.2f}, range {setup_result['null_fraction_range'][0]:.2f}-"
        f"{setup_result['null_fraction_range'][1]:.2f})\n\n{setup_table}\n\n## Training step\n\n{step_table}\n\n"
        f"Base model weights: {mib(weights['base_model_bytes']):.0f} MiB.\n\n## Goals\n\n{goal_lines}"
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, PROFILES, "llama7b_gpu")
    add_shape_arguments(parser, "layers")
    parser.add_argument("--calibration-prompts", type=int, help="override the number of calibration prompts")
    parser.add_argument(
        "--threshold", type=float, default=1e-6, help="NullSpaceProjection relative eigenvalue threshold (paper: 1e-6)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per design")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per design (median)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per design under the peak-memory monitor")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: known GPUs)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, env = start_run(args)
    profile = PROFILES[args.profile]
    if args.layers is not None:
        profile = replace(profile, setup=replace(profile.setup, layers=args.layers))
    if args.calibration_prompts is not None:
        profile = replace(profile, calibration_prompts=args.calibration_prompts)
    setup = profile.setup
    print(f"llama7b_gpu benchmark, profile {args.profile}: {profile}\n{describe_machine(env)}\n", flush=True)

    model = steps.add_lora(steps.build_base_model(setup, args.profile, args.seed, device), setup.rank)
    input_ids = torch.randint(
        0, setup.vocab, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    setup_result, real_projectors = run_setup(model, input_ids, profile, args, device)
    print(f"set-up: {setup_result['setup_seconds']:.1f}s", flush=True)
    # Written now too, so that a run cut off during the step timing still leaves the set-up numbers.
    finish_run(args, "llama7b_gpu", {"benchmark": "llama7b_gpu", "profile": args.profile, "shape": asdict(setup),
                                     "environment": env, "setup": setup_result, "complete": False})
    model.to(device)  # Trainer.fit's teardown moved the model back to the CPU
    release_memory(device)

    model.train()
    targets = find_lora_targets(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    autocast_dtype = torch.bfloat16 if setup.autocast else None
    steps.warm_up(model, input_ids, autocast_dtype)
    step_args = argparse.Namespace(grad_accum=1, null_fraction=0.5, seed=args.seed)
    designs = {
        "lora": dict(name="lora"),
        "guardspace": dict(name="guardspace", projectors=real_projectors),
        "guardspace_half_null": dict(name="guardspace", label="guardspace_half_null"),  # random bases, d = n/2
        "official_dense_P": dict(name="official_dense_P", projectors=real_projectors),
        "spf": dict(name="spf"),  # one extra safety forward + backward per step
        "asft": dict(name="asft"),
    }

    def make(design: str) -> steps.Design:
        return steps.Design(
            model=model,
            targets=targets,
            initial=initial,
            input_ids=input_ids,
            args=step_args,
            autocast_dtype=autocast_dtype,
            device=device,
            **designs[design],
        )

    memory = {design: steps.measure_memory(design, make, args.memory_steps, device) for design in designs}
    with heap_reuse(device):
        times = steps.time_designs(list(designs), make, args.warmup, args.steps, True, device)
    results = [steps.DesignResult(design, times[design], *memory[design]) for design in designs]
    weights = steps.weight_bytes(model, targets)
    flops = flops_per_token(model, setup)
    peak = peak_tflops(device, args.peak_tflops)
    tokens = setup.batch * setup.seq
    rows = []
    for r in results:
        row = steps.design_summary(r, results[0], weights)
        row["tokens_per_s"] = tokens / r.median_s
        row["mfu"] = row["tokens_per_s"] * flops / (peak * 1e12) if peak else None
        rows.append(row)
    by_design = {r["design"]: r for r in rows}
    goals = {
        "setup_seconds": goal(setup_result["setup_seconds"], "<", GOALS["setup_seconds"]),
        "guardspace_step_ratio": goal(by_design["guardspace"]["time_ratio_vs_lora"], "<=", GOALS["step_ratio"]),
        "guardspace_half_null_step_ratio": goal(
            by_design["guardspace_half_null"]["time_ratio_vs_lora"], "<=", GOALS["step_ratio"]
        ),
        "projector_percent_of_weights": goal(
            max(by_design[d]["projector_percent_of_base_weights"] for d in ("guardspace", "guardspace_half_null")),
            "<=", GOALS["projector_percent_of_weights"],
        ),
    }
    print(render(setup_result, rows, weights, goals))

    payload = {
        "benchmark": "llama7b_gpu",
        "profile": args.profile,
        "shape": asdict(setup),
        "calibration": {
            "prompts": profile.calibration_prompts,
            "tokens_each": profile.calibration_tokens,
            "threshold": args.threshold,
        },
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_steps": args.memory_steps,
        "memory_method": memory_method(device),
        "flops_per_token": flops,
        "peak_tflops": peak,
        "environment": env,
        "weights": weights,
        "setup": setup_result,
        "designs": rows,
        "goals": goals,
        "complete": True,
    }
    finish_run(args, "llama7b_gpu", payload)
    return payload


if __name__ == "__main__":
    main()
