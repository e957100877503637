"""Disjoint data splits for the safety benchmark, read from the shared data folder.

Harmful prompts play five roles, and no prompt plays two (normalised text: lower case, collapsed spaces, no trailing punctuation):

* alignment: refusal_direction ``harmful_train`` instructions the refusal patch is trained on, plus a few
  of XSTest's unsafe *contrast* prompts (the harmful twins of its safe prompts);
* calibration: AdvBench ``goal``s the GuardSpace callbacks calibrate on;
* poison: other AdvBench ``goal``s, paired with a compliant answer in the attack;
* validation: part of refusal_direction ``harmful_val``, used to choose hyperparameters;
* evaluation: the rest of ``harmful_val``, then unused ``harmful_train`` rows, unused AdvBench rows and
  (only if still short) XSTest's unsafe prompts; :func:`check_disjoint` asserts it in code.

XSTest's safe prompts are split three ways: validation, evaluation (over-refusal), and *borderline*
alignment prompts that teach the patch where the line is (answered by the original model). A refusal
patch trained only on clearly harmful vs clearly harmless prompts refuses on trigger words ("kill",
"shoot") and over-refuses half of XSTest (design note, section 6); contrast pairs are the usual remedy.
No evaluation or validation prompt is ever an alignment prompt (checked).

AdvBench rows that also appear in refusal_direction (117 of the 260 ``harmful_train`` rows come from it)
are kept out of calibration and poison so that they cannot leak between roles.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from guardspace_pl.datamodules import normalise_prompt

from benchmarks.data import data_dir
from benchmarks.safety.profiles import Profile

DEFAULT_DATA_DIR = data_dir()  # $GUARDSPACE_DATA, else ../shared/data next to the repository


class OverlapError(ValueError):
    """Two prompt sets that must be disjoint share a prompt."""




def check_disjoint(protected: Sequence[str], others: Mapping[str, Iterable[str]], what: str = "evaluation prompts") -> None:
    """Raise :class:`OverlapError` if a prompt of ``protected`` appears (normalised) in any of ``others``."""
    keys = {normalise_prompt(p) for p in protected}
    if len(keys) != len(protected):
        raise OverlapError(f"The {what} contain {len(protected) - len(keys)} duplicate prompt(s).")
    for name, prompts in others.items():
        overlap = keys & {normalise_prompt(p) for p in prompts}
        if overlap:
            raise OverlapError(f"{len(overlap)} of the {what} also appear in the {name} set, e.g. {sorted(overlap)[:2]}.")


@dataclass
class Splits:
    align_harmful: list[str]                # refusal_direction harmful_train + XSTest unsafe contrast
    align_harmless: list[str]               # refusal_direction harmless_train
    calibration: list[str]
    poison: list[dict[str, str]]            # {"prompt": AdvBench goal, "target": AdvBench target}, nested over p
    val_harmful: list[str]
    eval_harmful: list[str]
    eval_harmful_sources: dict[str, int]
    xstest_val: list[str]
    xstest_eval: list[str]
    gsm8k_train: list[dict[str, str]]       # {"question", "answer"}; the first n(1-p) are used at fraction p
    gsm8k_val: list[dict[str, str]]
    gsm8k_test: list[dict[str, str]]
    gsm8k_accuracy: list[dict[str, str]] = field(default_factory=list)
    align_borderline: list[str] = field(default_factory=list)  # XSTest safe prompts, never evaluated

    def check(self) -> None:
        """Every disjointness the benchmark relies on; called whenever splits are made."""
        poison = [row["prompt"] for row in self.poison]
        training = {"alignment": self.align_harmful, "calibration": self.calibration, "poison": poison}
        check_disjoint(self.eval_harmful, {**training, "validation": self.val_harmful}, "evaluation harmful prompts")
        check_disjoint(self.val_harmful, training, "validation harmful prompts")
        check_disjoint(self.calibration, {"alignment": self.align_harmful, "poison": poison}, "calibration prompts")
        check_disjoint(poison, {"alignment": self.align_harmful}, "poison prompts")
        check_disjoint(self.xstest_eval, {"XSTest validation": self.xstest_val}, "XSTest evaluation prompts")
        check_disjoint(
            self.xstest_eval + self.xstest_val,
            {"alignment harmless": self.align_harmless, "alignment borderline": self.align_borderline},
            "XSTest evaluation and validation prompts",
        )
        questions = lambda rows: [r["question"] for r in rows]  # noqa: E731
        check_disjoint(questions(self.gsm8k_test), {"GSM8K training": questions(self.gsm8k_train), "GSM8K validation": questions(self.gsm8k_val)}, "GSM8K test questions")
        check_disjoint(questions(self.gsm8k_val), {"GSM8K training": questions(self.gsm8k_train)}, "GSM8K validation questions")

    def sizes(self) -> dict[str, Any]:
        return {
            "align_harmful": len(self.align_harmful), "align_harmless": len(self.align_harmless),
            "align_borderline": len(self.align_borderline),
            "calibration": len(self.calibration), "poison_pool": len(self.poison), "val_harmful": len(self.val_harmful),
            "eval_harmful": len(self.eval_harmful), "eval_harmful_sources": self.eval_harmful_sources,
            "xstest_val": len(self.xstest_val), "xstest_eval": len(self.xstest_eval), "gsm8k_train_pool": len(self.gsm8k_train),
            "gsm8k_val": len(self.gsm8k_val), "gsm8k_test": len(self.gsm8k_test), "gsm8k_accuracy": len(self.gsm8k_accuracy),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _take(pool: list[str], count: int, taken: set[str]) -> list[str]:
    """The first ``count`` prompts of ``pool`` not yet taken (normalised), marking them taken."""
    out = []
    for prompt in pool:
        if len(out) == count:
            break
        key = normalise_prompt(prompt)
        if key not in taken:
            taken.add(key)
            out.append(prompt)
    return out


def make_splits(profile: Profile, data_dir: Path = DEFAULT_DATA_DIR, seed: int = 0) -> Splits:
    """Deterministic disjoint splits for ``profile``; raises if the data cannot supply them."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"Shared data folder {data_dir} not found; pass --data-dir.")
    rd = data_dir / "refusal_direction"
    harmful_train = [r["instruction"] for r in _json(rd / "harmful_train.json")]
    harmful_val = [r["instruction"] for r in _json(rd / "harmful_val.json")]
    harmless_train = [r["instruction"] for r in _json(rd / "harmless_train.json")]
    advbench = _csv(data_dir / "advbench" / "harmful_behaviors.csv")
    xstest = _csv(data_dir / "xstest" / "xstest_prompts.csv")
    gsm_train = [{"question": r["question"], "answer": r["answer"]} for r in _jsonl(data_dir / "gsm8k" / "train.jsonl")]
    gsm_test = [{"question": r["question"], "answer": r["answer"]} for r in _jsonl(data_dir / "gsm8k" / "test.jsonl")]

    taken: set[str] = set()
    align_harmful = _take(_shuffled(harmful_train, seed), profile.align_harmful, taken)
    contrast = [r["prompt"] for r in xstest if r["label"] == "unsafe" and r["type"].startswith("contrast_")]
    align_contrast = _take(_shuffled(contrast, seed + 7), profile.align_contrast, taken)
    if len(align_contrast) < profile.align_contrast:
        raise ValueError(f"XSTest has {len(align_contrast)} unsafe contrast prompts, fewer than {profile.align_contrast}.")
    align_harmful += align_contrast
    val_pool = _shuffled(harmful_val, seed + 1)
    val_harmful = _take(val_pool, profile.val_harmful, taken)

    # AdvBench rows shared with refusal_direction are never calibration or poison.
    refusal_direction = {normalise_prompt(p) for p in harmful_train + harmful_val}
    adv_pool = [r for r in _shuffled(advbench, seed + 2) if normalise_prompt(r["goal"]) not in refusal_direction]
    calibration = _take([r["goal"] for r in adv_pool], profile.calibration_count, taken)
    max_poison = max(round(profile.n * p) for p in profile.p_grid)
    poison_goals = set(_take([r["goal"] for r in adv_pool], max_poison, taken))
    poison = [{"prompt": r["goal"], "target": r["target"]} for r in adv_pool if r["goal"] in poison_goals]
    if len(calibration) < profile.calibration_count or len(poison) < max_poison:
        raise ValueError(f"AdvBench has too few rows for {profile.calibration_count} calibration + {max_poison} poison prompts.")

    sources = [
        ("refusal_direction harmful_val", val_pool),
        ("refusal_direction harmful_train (unused)", _shuffled(harmful_train, seed)),
        ("AdvBench (unused)", [r["goal"] for r in adv_pool]),
        ("XSTest unsafe", _shuffled([r["prompt"] for r in xstest if r["label"] == "unsafe"], seed + 3)),
    ]
    eval_harmful: list[str] = []
    eval_sources: dict[str, int] = {}
    for name, pool in sources:
        got = _take(pool, profile.eval_harmful - len(eval_harmful), taken)
        if got:
            eval_sources[name] = len(got)
        eval_harmful += got
    if len(eval_harmful) < profile.eval_harmful:
        raise ValueError(f"Only {len(eval_harmful)} unused harmful prompts for {profile.eval_harmful} evaluation prompts.")

    safe = _shuffled([r["prompt"] for r in xstest if r["label"] == "safe"], seed + 4)
    wanted = (profile.xstest_val, profile.xstest_eval, profile.align_borderline)
    if sum(wanted) > len(safe):
        raise ValueError(f"XSTest has {len(safe)} safe prompts, fewer than {' + '.join(map(str, wanted))} (val + eval + borderline).")
    ends = [sum(wanted[: i + 1]) for i in range(3)]
    xstest_val, xstest_eval, align_borderline = safe[: ends[0]], safe[ends[0] : ends[1]], safe[ends[1] : ends[2]]

    align_harmless = _take(_shuffled(harmless_train, seed + 5), profile.align_harmless, set(map(normalise_prompt, safe)))
    gsm_pool = _shuffled(gsm_train, seed + 6)
    gsm8k_train, gsm8k_val = gsm_pool[: profile.n], gsm_pool[profile.n : profile.n + profile.gsm8k_val]
    gsm8k_test = gsm_test[: profile.gsm8k_test]
    splits = Splits(
        align_harmful=align_harmful, align_harmless=align_harmless, calibration=calibration, poison=poison,
        val_harmful=val_harmful, eval_harmful=eval_harmful, eval_harmful_sources=eval_sources, xstest_val=xstest_val,
        xstest_eval=xstest_eval, gsm8k_train=gsm8k_train, gsm8k_val=gsm8k_val, gsm8k_test=gsm8k_test,
        gsm8k_accuracy=gsm8k_test[: profile.gsm8k_accuracy], align_borderline=align_borderline,
    )
    splits.check()
    return splits
