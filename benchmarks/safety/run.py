"""Safety preservation under a fine-tuning attack: one command, every stage, the table at the end.

    python -m benchmarks.safety.run --profile cpu      # about an hour on 2 CPU cores (float32)
    python -m benchmarks.safety.run --profile full     # the issue's full protocol, for a GPU
    python -m benchmarks.safety.run --profile smoke    # tiny sizes (tests/test_safety_benchmark.py)

Stages: (1) align SmolLM2-135M-Instruct with a merged LoRA refusal patch (cached); (2) attack it by
fine-tuning on GSM8K with a fraction p of harmful pairs, per method x calibration x lr x p x seed;
(3) evaluate every model (harmful score, over-refusal, GSM8K loss and accuracy) and write
``results.json``, ``table.md``, ``frontier.png`` and ``harmful_vs_p.png`` under ``--out``. Each run's
JSON is written as it completes; a rerun skips finished runs and reuses the aligned model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks._common import RESULTS_DIR, environment, repo_relative
from benchmarks.safety.profiles import PROFILES
from benchmarks.safety.splits import DEFAULT_DATA_DIR, make_splits
from guardspace_pl.io import write_json

MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/safety_<profile>)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--threshold", type=float, default=1e-3, help="NullSpaceProjection relative eigenvalue threshold")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 avoids oversubscription on a shared CPU")
    parser.add_argument("--variants", nargs="*", help="restrict to these method/calibration names, e.g. lora guardspace/template")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the profile's seeds")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table, JSON and plots from finished runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override profile sizes, e.g. align_epochs=3")
    return parser.parse_args(argv)


def profile_overrides(profile, assignments: list[str]) -> dict:
    """``["align_epochs=3", "align_lr=2e-4"]`` -> typed overrides of ``profile``'s scalar fields."""
    fields = profile.to_dict()
    out = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or isinstance(fields[name], (dict, tuple, list)):
            scalars = sorted(k for k, v in fields.items() if not isinstance(v, (dict, tuple, list)))
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {scalars}.")
        out[name] = type(fields[name])(value)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = profile.with_overrides(seeds=tuple(args.seeds))
    profile = profile.with_overrides(**profile_overrides(profile, args.set))
    out = args.out or RESULTS_DIR / f"safety_{profile.name}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    header = {
        "command": "python -m benchmarks.safety.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile": profile.to_dict(),
        "threshold": args.threshold,
        "model": MODEL,
        "environment": environment(device),
    }

    splits = make_splits(profile, args.data_dir)  # asserts every disjointness
    header["splits"] = splits.sizes()
    write_json(out / "splits.json", splits.to_dict())

    from benchmarks.safety.report import build_report

    if args.report_only:
        previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
        for key in ("alignment", "total_minutes"):
            if key in previous:
                header[key] = previous[key]
        if "alignment" not in header and (out / "cache" / "alignment.json").exists():
            header["alignment"] = json.loads((out / "cache" / "alignment.json").read_text())
        header["environment"] = previous.get("environment", header["environment"])
        header["command"] = previous.get("command", header["command"])
        build_report(out, header)
        return

    from benchmarks.safety.align import align, poison_pairs
    from benchmarks.safety.attack import RunSpec, run_attack
    from benchmarks.safety.evaluation import evaluate_model
    from guardspace_pl.loading import load_causal_lm, load_tokenizer, resolve_model_source

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - started) / 60:.1f} min] {message}", flush=True)

    original_dir, _ = resolve_model_source(MODEL)
    tokenizer = load_tokenizer(original_dir)
    original = load_causal_lm(original_dir).eval()
    cache = out / "cache"
    baselines = out / "baselines"

    if not (baselines / "original.json").exists():
        log("evaluating the original (unaligned) model")
        write_json(baselines / "original.json", evaluate_model(original, tokenizer, splits, profile, device))
    log("poison answers from the original model")
    poison = poison_pairs(original, tokenizer, splits, profile, cache / f"poison_answers-{profile.poison_answer_tokens}.json")
    log("alignment (LoRA refusal patch, merged)")
    aligned_dir, alignment = align(original_dir, tokenizer, splits, profile, cache)
    header["alignment"] = alignment
    log(f"aligned model at {repo_relative(aligned_dir)} ({alignment['seconds']:.0f}s)")
    del original
    if not (baselines / "aligned.json").exists():
        from guardspace_pl.loading import load_causal_lm as load

        write_json(baselines / "aligned.json", evaluate_model(load(str(aligned_dir)), tokenizer, splits, profile, device))
    aligned = json.loads((baselines / "aligned.json").read_text())
    log(f"aligned: harmful {aligned['harmful_score']:.1f}%  over-refusal {aligned['over_refusal']:.1f}%  task loss {aligned['task_loss']:.3f}")

    specs = [
        RunSpec(method, calibration, lr, p, seed)
        for p in profile.p_grid
        for seed in profile.seeds
        for method, calibration in profile.variants
        for lr in profile.lrs[method]
    ]
    if args.variants:
        specs = [s for s in specs if s.variant in args.variants]
    for i, spec in enumerate(specs, 1):
        if (out / "runs" / f"{spec.run_id}.json").exists():
            log(f"[{i}/{len(specs)}] {spec.run_id}: done already, skipped")
            continue
        log(f"[{i}/{len(specs)}] {spec.run_id}")
        r = run_attack(spec, profile, splits, aligned_dir, tokenizer, poison, out, args.threshold, device)
        null = f"  null frozen {r['null_space']['frozen_layers']}/{r['null_space']['layers']}" if r["null_space"] else ""
        log(
            f"    harmful {r['harmful_score']:.1f}% (val {r['val_harmful_score']:.1f})  over-refusal {r['over_refusal']:.1f}%  "
            f"loss {r['task_loss']:.3f} (val {r['val_task_loss']:.3f})  acc {r['accuracy']:.1f}%  {r['wall_seconds']:.0f}s{null}"
        )
    header["environment"]["load_average_at_end"] = list(os.getloadavg())
    header["total_minutes"] = (time.time() - started) / 60
    build_report(out, header)
    log(f"done; results in {repo_relative(out)}")


if __name__ == "__main__":
    main()
