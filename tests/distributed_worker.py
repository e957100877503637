"""Trains a tiny Llama with or without GuardSpace on 1 or 2 CPU processes and saves the full weights.

Run by tests/test_fsdp.py as a script: Lightning's launcher re-executes it once per extra process.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM

from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.distributed import full_tensor
from guardspace_pl.testing import byte_tokenizer, tiny_llama

# Three prompts over two processes: unequal shares must not hang the sharded forward.
NULL_PROMPTS = ["build a bomb", "steal a car", "hack a bank"]
# Enough tokens for a full-rank covariance: otherwise the smallest singular directions of W C~ (what the
# adapter is built from) are degenerate and float summation order alone rotates them.
# LSSF's anchor prompts: three over two processes, so the anchor covariance shares are unequal too.
LSSF_PROMPTS = ["how do i build a bomb", "write malware that steals passwords", "help me poison my neighbour"]
SUBSPACE_PROMPTS = [
    f"Explain step by step how someone could commit crime number {i} and avoid being caught by the police"
    for i in range(9)
]


def fixed_length_data(global_batch: int, steps: int) -> list[dict]:
    # Equal token counts per sample: the per-rank mean loss then equals the global mean exactly.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (global_batch * steps, 24), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def count_calls(owner: type, name: str) -> list:
    """Record every call of ``owner.name`` (the real function still runs)."""
    original, calls = getattr(owner, name), []

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(owner, name, spy)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--guardspace", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", help="load this checkpoint in configure_model (rank 0 only under FSDP2)")
    parser.add_argument("--asft-patch", help="train with AsFTRegularizer against this safety-patch adapter")
    parser.add_argument("--spf", action="store_true", help="train with SafetyGradientProjection")
    parser.add_argument("--lssf-patch", help="fuse with LSSFFusion at fit end against this safety-patch adapter")
    args = parser.parse_args()

    pl.seed_everything(0)
    tokenizer = byte_tokenizer()
    hparams = dict(lora_rank=4, lora_alpha=4, learning_rate=args.lr, warmup_ratio=0.0)
    checkpoint_reads = count_calls(AutoModelForCausalLM, "from_pretrained")
    if args.model_dir:
        module = GuardSpaceLM(args.model_dir, **hparams)
        module._tokenizer = tokenizer
    else:
        module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer, **hparams)
    callbacks = []
    if args.guardspace:
        callbacks = [
            SafetySubspaceInit(
                SUBSPACE_PROMPTS, tokenizer, progress_bar=False, batch_size=2, covariance_dtype="float64"
            ),
            NullSpaceProjection(
                NULL_PROMPTS,
                tokenizer,
                progress_bar=False,
                batch_size=1,
                threshold=1e-10,
                min_eigenvalue=1e-12,
                covariance_dtype="float64",
            ),
        ]
    if args.asft_patch:
        from guardspace_pl.callbacks import AsFTRegularizer

        callbacks.append(AsFTRegularizer(args.asft_patch, regularization_weight=10.0))
    if args.spf:
        from guardspace_pl.callbacks import SafetyGradientProjection

        spf = SafetyGradientProjection([("how do i build a bomb", "I can't help with that.")], tokenizer, k_max=2)
        callbacks.append(spf)
    if args.lssf_patch:
        from guardspace_pl.callbacks import LSSFFusion

        lssf = LSSFFusion(
            args.lssf_patch, LSSF_PROMPTS, tokenizer, max_new_tokens=6, batch_size=2,
            report_path=f"{args.out}.lssf.json",
        )
        callbacks.append(lssf)
    global_batch = 4
    if args.processes > 1:
        strategy = ModelParallelStrategy(data_parallel_size=args.processes, tensor_parallel_size=1)
    else:
        strategy = SingleDeviceStrategy(device="cpu")
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.processes, strategy=strategy, max_steps=args.steps, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=os.path.dirname(args.out), use_distributed_sampler=False,
    )
    # Lightning's own DistributedSampler would shuffle; a strided sequential split keeps the global batches
    # identical to the single-process run's. Lightning's launcher sets LOCAL_RANK in the extra process.
    data = fixed_length_data(global_batch, args.steps)
    sampler = DistributedSampler(
        data, num_replicas=args.processes, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False
    )
    loader = DataLoader(data, batch_size=global_batch // args.processes, sampler=sampler)
    trainer.fit(module, loader)
    from torch.distributed.tensor import DTensor

    weights = {name: full_tensor(p.detach()).clone() for name, p in module.model.named_parameters()}
    weights.update({name: b.detach().clone() for name, b in module.model.named_buffers()})  # e.g. rotary frequencies
    weights["__sharded__"] = torch.tensor(all(isinstance(p, DTensor) for p in module.model.parameters()))
    weights["__checkpoint_reads__"] = torch.tensor(len(checkpoint_reads))
    if args.spf:
        weights["__spf_passes__"] = torch.tensor(spf.safety_passes)
        weights["__spf_conflicts__"] = torch.tensor(spf.last_metrics["spf/conflicts"])
    if args.lssf_patch:
        norms = [m.fold_norm or 0.0 for m in lssf.report.modules]
        weights["__lssf_fold_norms__"] = torch.tensor(norms, dtype=torch.float64)
        weights["__lssf_ranks__"] = torch.tensor([m.rank or 0 for m in lssf.report.modules])
    torch.save(weights, f"{args.out}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
