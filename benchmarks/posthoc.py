"""Cost of the post-hoc safety methods' shared parts: building a SafetyReference and applying SafeLoRA (and LSSF).

Measured on the real SmolLM2-135M-Instruct on the CPU (``builtin:smollm2-135m-instruct``): a fine-tuned model
(LoRA r = 8 on q_proj and v_proj, the paper's targets, random non-zero B) is repaired with SafeLoRA against

- a safety-patch reference (LoRA r = 8 on all seven linears of every block, factored ``V = s B A``), and
- a base/aligned checkpoint pair (the aligned copy is SmolLM2 with every linear perturbed, written once to a
  temporary directory; ``V`` is read tensor by tensor, one module at a time),

each with the faithful ``C = V V^T / ||V||_F`` and the orthonormal projector. Peak memory is what the step adds
to the process on top of the loaded fine-tuned model (process RSS, see ``_common``). The goal is "one model's
weights plus one module's temporaries": the table prints the largest module's dense ``V`` in float32 beside it.

Llama-2-7B figures are by arithmetic (no 7B checkpoint is read): bytes of what is held, floating-point
operations, and the bytes read from disk, with the throughputs measured here stated next to the estimates.

Example::

    python -m benchmarks.posthoc --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from benchmarks._common import (
    LLAMA_LINEAR_INPUT,
    add_common_arguments,
    describe_machine,
    finish_run,
    markdown_table,
    measure,
    memory_method,
    mib,
    start_run,
)
from guardspace_pl.loading import load_causal_lm, resolve_model_source
from guardspace_pl.lora import find_lora_targets
from guardspace_pl.safelora import apply_safelora
from guardspace_pl.safety_reference import SafetyReference

MODEL = "builtin:smollm2-135m-instruct"
LINEARS = list(LLAMA_LINEAR_INPUT)
FINETUNE_TARGETS = ["q_proj", "v_proj"]
RANK = 8
LSSF_ANCHORS, LSSF_NEW_TOKENS = 16, 32
#: Llama-2-7B: 32 blocks of (d_out, d_in) per linear
LLAMA7B = {
    "layers": 32,
    "shapes": {
        "q_proj": (4096, 4096),
        "k_proj": (4096, 4096),
        "v_proj": (4096, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (11008, 4096),
        "up_proj": (11008, 4096),
        "down_proj": (4096, 11008),
    },
}


def lora_model(model, targets, rank, seed):
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for target in find_lora_targets(peft_model):
            target.lora_B.copy_(0.01 * torch.randn(target.lora_B.shape, generator=generator))
    return peft_model


def write_aligned_copy(directory: Path, seed: int) -> None:
    """SmolLM2 with every linear weight perturbed: a stand-in 'aligned' checkpoint for the base/aligned pair."""
    model = load_causal_lm(MODEL)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.add_(1e-3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)


def llama7b_arithmetic(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """What SafeLoRA needs at Llama-2-7B size, from shapes alone, plus time estimates at this machine's throughputs."""
    layers, shapes = LLAMA7B["layers"], LLAMA7B["shapes"]
    model_bytes = 6.74e9 * 2  # fp16 weights
    targets = [shapes[name] for name in FINETUNE_TARGETS] * layers
    largest = max(m * n for m, n in targets)  # only the fine-tuned modules' V are read
    # Checkpoint pair: per module, aligned read (fp16) -> float32 V, base read (fp16) and its float32 copy.
    pair_peak = largest * (4 + 2 + 4)
    pair_read = sum(m * n for m, n in targets) * 2 * 2  # both checkpoints' tensors of the fine-tuned modules, fp16
    # Faithful C B = V (V^T B) / ||V||: 4 m n r flops per module, + ||V||: 2 m n.
    pair_flops = sum(4 * m * n * RANK + 2 * m * n for m, n in targets)
    patch_bytes = layers * sum((m + n) * RANK for m, n in shapes.values()) * 4  # factors of the patch, float32
    patch_flops = sum(2 * (m * RANK * RANK) * 3 for m, n in targets)  # QR + U^T B + U (.) products, tiny
    held_B = sum(m * RANK for m, _ in targets) * 4 * 2  # projected and original B per module until selection
    gflops = measured["gflops"]
    read_gbs = measured["read_gb_per_s"]
    return [
        {"reference": "base/aligned checkpoints", "projector": "faithful",
         "extra_memory_mib": mib(pair_peak + held_B), "one_model_mib": mib(model_bytes),
         "disk_read_gib": pair_read / 2**30, "gflop": pair_flops / 1e9,
         "estimated_seconds": pair_read / 1e9 / read_gbs + pair_flops / 1e9 / gflops},
        {"reference": "base/aligned checkpoints", "projector": "orthonormal",
         # + the float64 V and its U (thin SVD) of the largest module
         "extra_memory_mib": mib(pair_peak + largest * 8 * 2 + held_B), "one_model_mib": mib(model_bytes),
         "disk_read_gib": pair_read / 2**30,
         # a float64 thin SVD of every dense V: ~ 4 m n^2 + 22 n^3 flops (Golub-Van Loan, R-SVD) for m >= n
         "gflop": sum(4 * max(m, n) * min(m, n) ** 2 + 22 * min(m, n) ** 3 for m, n in targets) / 1e9,
         "estimated_seconds": None},
        {"reference": "safety patch (r=8, all linears)", "projector": "faithful or orthonormal",
         "extra_memory_mib": mib(patch_bytes + held_B), "one_model_mib": mib(model_bytes),
         "disk_read_gib": patch_bytes / 2 / 2**30, "gflop": patch_flops / 1e9,
         "estimated_seconds": patch_flops / 1e9 / gflops},
    ]


def lssf_measurements(model, targets, patch_dir: Path, device: torch.device) -> dict[str, Any]:
    """LSSF on the same fine-tuned model and safety patch: anchors (greedy refusals + covariances), then the fusion."""
    from guardspace_pl.datamodules.sources import load_prompts
    from guardspace_pl.loading import load_tokenizer
    from guardspace_pl.lssf import apply_lssf, collect_anchor_covariances

    tokenizer = load_tokenizer(MODEL)
    prompts = load_prompts("builtin:harmbench")[:LSSF_ANCHORS]
    reference = SafetyReference.from_patch_adapter(patch_dir)
    (covariances, _), anchor_s, anchor_memory = measure(
        lambda: collect_anchor_covariances(model, targets, tokenizer, prompts, LSSF_NEW_TOKENS, 8), device
    )
    frozen = {t.hf_name: t.base.weight.detach().clone() for t in targets}

    def run() -> Any:
        with torch.no_grad():  # measure() runs twice on the CPU: fold into the original weights each time
            for t in targets:
                t.base.weight.copy_(frozen[t.hf_name])
        return apply_lssf(targets, reference, covariances, num_anchor_prompts=len(prompts))

    report, apply_s, apply_memory = measure(run, device)
    covariance_bytes = sum(c.numel() * c.element_size() for c in {id(c): c for c in covariances.values()}.values())
    fused = [m for m in report.modules if m.skipped is None]
    return {
        "anchors": len(prompts),
        "new_tokens": LSSF_NEW_TOKENS,
        "anchor_s": anchor_s,
        "anchor_extra_mib": mib(anchor_memory.delta_bytes),
        "covariances_mib": mib(covariance_bytes),
        "apply_s": apply_s,
        "apply_extra_mib": mib(apply_memory.delta_bytes),
        "fused": len(fused),
        "rank_min": min(m.rank for m in fused),
        "rank_max": max(m.rank for m in fused),
    }


def throughputs(directory: Path) -> dict[str, float]:
    """This machine's float32 matmul GFLOP/s (1 call of the shape SafeLoRA uses) and safetensors read GB/s."""
    import time

    from guardspace_pl.safety_reference import read_tensor

    v, b = torch.randn(1536, 576), torch.randn(1536, RANK)
    start = time.perf_counter()
    for _ in range(50):
        v @ (v.T @ b)
    gflops = 50 * 4 * v.numel() * RANK / 1e9 / (time.perf_counter() - start)
    file = directory / "model.safetensors"
    keys = [k for k in __import__("safetensors").safe_open(str(file), "pt").keys() if k.endswith("proj.weight")]
    start = time.perf_counter()
    total = sum(read_tensor(file, key).numel() * 4 for key in keys)
    return {"gflops": gflops, "read_gb_per_s": total / 1e9 / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ["smollm2"], "posthoc")
    parser.set_defaults(profile="smollm2", device="cpu")
    args = parser.parse_args()
    device, env = start_run(args)
    base_dir = Path(resolve_model_source(MODEL)[0])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_aligned_copy(tmp / "aligned", args.seed)
        lora_model(load_causal_lm(MODEL), LINEARS, RANK, args.seed + 1).save_pretrained(tmp / "patch")
        model = lora_model(load_causal_lm(MODEL), FINETUNE_TARGETS, RANK, args.seed + 2)
        targets = find_lora_targets(model)
        originals = {t.hf_name: t.lora_B.detach().clone() for t in targets}
        largest_v = max(t.shape[0] * t.shape[1] for t in targets) * 4

        def restore() -> None:
            with torch.no_grad():
                for t in targets:
                    t.lora_B.copy_(originals[t.hf_name])

        builders = {
            "safety patch (r=8, all linears)": lambda: SafetyReference.from_patch_adapter(tmp / "patch"),
            "base/aligned checkpoints": lambda: SafetyReference.from_checkpoints(base_dir, tmp / "aligned"),
        }
        for source, build in builders.items():
            reference, build_s, build_memory = measure(build, device)
            for projector in ("faithful", "orthonormal"):
                def run() -> Any:
                    restore()
                    return apply_safelora(targets, reference, "number", 10, 0.5, projector)

                report, apply_s, apply_memory = measure(run, device)
                rows.append(
                    {
                        "reference": source,
                        "projector": projector,
                        "modules": len(targets),
                        "projected": len(report.projected_names),
                        "build_s": build_s,
                        "build_extra_mib": mib(build_memory.delta_bytes),
                        "apply_s": apply_s,
                        "apply_extra_mib": mib(apply_memory.delta_bytes),
                        "largest_dense_v_mib": mib(largest_v),
                        "pdst": report.pdst,
                    }
                )
        lssf = lssf_measurements(model, targets, tmp / "patch", device)  # last: it changes the frozen weights
        rates = throughputs(base_dir)
    estimates = llama7b_arithmetic(rates)

    print(
        f"\nSafetyReference + SafeLoRA on {MODEL}, LoRA r={RANK} on {FINETUNE_TARGETS}, K=10; "
        f"{describe_machine(env)}"
    )
    print(markdown_table(
        [
            "reference",
            "projector",
            "build s",
            "build +MiB",
            "apply s",
            "apply +MiB",
            "largest dense V MiB",
            "projected",
            "Pdst",
        ],
        [
            [
                r["reference"],
                r["projector"],
                f"{r['build_s']:.3f}",
                f"{r['build_extra_mib']:.1f}",
                f"{r['apply_s']:.3f}",
                f"{r['apply_extra_mib']:.1f}",
                f"{r['largest_dense_v_mib']:.1f}",
                f"{r['projected']}/{r['modules']}",
                f"{r['pdst']:.3f}",
            ]
            for r in rows
        ],
    ))
    print(f"\nLlama-2-7B by arithmetic (fine-tuned LoRA r={RANK} on {FINETUNE_TARGETS}; this machine: "
          f"{rates['gflops']:.1f} GFLOP/s float32 matmul, {rates['read_gb_per_s']:.2f} GB/s safetensors reads)")
    print(markdown_table(
        ["reference", "projector", "extra memory MiB", "one model (fp16) MiB", "disk read GiB", "GFLOP", "estimated s"],
        [
            [
                e["reference"],
                e["projector"],
                f"{e['extra_memory_mib']:.0f}",
                f"{e['one_model_mib']:.0f}",
                f"{e['disk_read_gib']:.2f}",
                f"{e['gflop']:.1f}",
                "-" if e["estimated_seconds"] is None else f"{e['estimated_seconds']:.1f}",
            ]
            for e in estimates
        ],
    ))
    print(f"\nLSSF on the same model (safety patch reference, {lssf['anchors']} HarmBench anchors, "
          f"{lssf['new_tokens']} new tokens, alpha=1, eta=0.9)")
    print(markdown_table(
        ["anchors s", "anchors +MiB", "covariances MiB", "fusion s", "fusion +MiB", "fused layers", "r_l range"],
        [
            [
                f"{lssf['anchor_s']:.2f}",
                f"{lssf['anchor_extra_mib']:.1f}",
                f"{lssf['covariances_mib']:.1f}",
                f"{lssf['apply_s']:.2f}",
                f"{lssf['apply_extra_mib']:.1f}",
                str(lssf["fused"]),
                f"{lssf['rank_min']}-{lssf['rank_max']}",
            ]
        ],
    ))
    payload = {
        "environment": env,
        "lssf": lssf,
        "memory_method": memory_method(device),
        "model": MODEL,
        "rank": RANK,
        "finetune_targets": FINETUNE_TARGETS,
        "measured": rows,
        "throughputs": rates,
        "llama7b_arithmetic": estimates,
    }
    finish_run(args, "posthoc", payload)


if __name__ == "__main__":
    main()
