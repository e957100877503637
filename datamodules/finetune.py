"""``GuardSpaceDataModule``: a task set mixed with harmful pairs, plus the callbacks' calibration prompts."""

from __future__ import annotations

import random
from functools import partial
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.loading import load_tokenizer
from guardspace_pl.prompts import PromptFormat

from .sources import Example, load_harmful_pairs, load_prompts, load_task_examples

TrainingFormat = Literal["alpaca", "chat_template"]
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def normalise_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, training_format: TrainingFormat, max_length: int
) -> dict[str, list[int]]:
    """Token ids with labels ``-100`` exactly on the prompt, so the loss covers only the response."""
    if training_format == "alpaca":
        prompt_text, special = ALPACA_TEMPLATE.format(prompt=example.prompt), True
    elif training_format == "chat_template":
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
        )
        special = False
    else:
        raise ValueError(f"Unknown training format {training_format!r}; use 'alpaca' or 'chat_template'.")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class TokenizedDataset(Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; padding is masked out of attention and labels."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class GuardSpaceDataModule(LightningDataModule):
    """Fine-tuning data with the paper's poisoning protocol, and calibration prompts for the callbacks.

    Args:
        tokenizer: name/path of the tokenizer (``builtin:smollm2-135m-instruct`` works offline); the CLI
            links it to the model's.
        task: ``builtin:arithmetic`` (generated, offline), ``gsm8k``/``sst2``/``agnews``/``alpaca`` (hub), or a
            local JSON/JSONL/CSV file with ``prompt_column``/``response_column``.
        num_task_samples: ``n``, the size of the fine-tuning set (task + harmful).
        poison_fraction: ``p``, the fraction of the ``n`` samples that are harmful instruction + compliant
            answer pairs from ``poison_source`` (e.g. AdvBench's CSV with ``goal``/``target``).
        calibration_source: harmful prompts for ``SafetySubspaceInit`` (``builtin:harmbench``, a file, ``hub:``).
        null_space_source: prompts for ``NullSpaceProjection`` (default: ``calibration_source``).
        evaluation_source: harmful prompts used for evaluation; checked disjoint from the poison pairs.
        training_format: ``alpaca`` (paper) or ``chat_template``; calibration follows it unless the
            callbacks set ``prompt_format`` themselves.
        val_fraction: held-out share of the task examples for ``val_loss``.
    """

    def __init__(
        self,
        tokenizer: str,
        tokenizer_gguf_file: Optional[str] = None,
        task: str = "builtin:arithmetic",
        task_split: str = "train",
        prompt_column: Optional[str] = None,
        response_column: Optional[str] = None,
        num_task_samples: int = 1000,
        poison_fraction: float = 0.0,
        poison_source: Optional[str] = None,
        calibration_source: str = "builtin:harmbench",
        calibration_count: Optional[int] = None,
        null_space_source: Optional[str] = None,
        null_space_count: Optional[int] = None,
        evaluation_source: Optional[str] = None,
        training_format: TrainingFormat = "chat_template",
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if not 0.0 <= poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must lie in [0, 1], got {poison_fraction}.")
        if poison_fraction > 0 and poison_source is None:
            raise ValueError("poison_fraction > 0 needs a poison_source (e.g. AdvBench harmful_behaviors.csv).")
        if num_task_samples < 1:
            raise ValueError(f"num_task_samples must be positive, got {num_task_samples}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self._calibration: dict[str, list[str]] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer, self.hparams.tokenizer_gguf_file)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: PreTrainedTokenizerBase) -> None:
        self._tokenizer = value

    @property
    def prompt_format(self) -> PromptFormat:
        """The format the model is trained in: calibration defaults to it (design note, section 6)."""
        return "chat_template" if self.hparams.training_format == "chat_template" else "raw"

    def calibration_prompts(self, kind: Literal["subspace", "null_space"]) -> list[str]:
        """Raw harmful prompts for ``SafetySubspaceInit`` (``subspace``) or ``NullSpaceProjection`` (``null_space``)."""
        if kind not in ("subspace", "null_space"):
            raise ValueError(f"Unknown calibration kind {kind!r}; use 'subspace' or 'null_space'.")
        if kind not in self._calibration:
            hp = self.hparams
            source, count = hp.calibration_source, hp.calibration_count
            if kind == "null_space" and hp.null_space_source is not None:
                source, count = hp.null_space_source, hp.null_space_count
            elif kind == "null_space" and hp.null_space_count is not None:
                count = hp.null_space_count
            prompts = load_prompts(source)
            if count is not None:
                prompts = random.Random(hp.seed).sample(prompts, min(count, len(prompts)))
            if not prompts:
                raise ValueError(f"The {kind} calibration source {source} yields no prompts.")
            self._calibration[kind] = prompts
        return self._calibration[kind]

    def build_examples(self) -> tuple[list[Example], list[Example]]:
        """Deterministic given the seed: ``n (1 - p)`` task examples, ``n p`` harmful pairs, shuffled."""
        hp = self.hparams
        num_poison = round(hp.num_task_samples * hp.poison_fraction)
        num_val = round((hp.num_task_samples - num_poison) * hp.val_fraction)
        task = load_task_examples(
            hp.task, hp.num_task_samples - num_poison + num_val, hp.seed, hp.prompt_column, hp.response_column, hp.task_split
        )
        val, task = task[:num_val], task[num_val:]
        poison: list[Example] = []
        if num_poison:
            protected = {normalise_prompt(p) for p in self.calibration_prompts("subspace") + self.calibration_prompts("null_space")}
            candidates = [e for e in load_harmful_pairs(hp.poison_source) if normalise_prompt(e.prompt) not in protected]
            if len(candidates) < num_poison:
                raise ValueError(
                    f"Only {len(candidates)} harmful pairs in {hp.poison_source} are disjoint from the calibration "
                    f"prompts; {num_poison} are needed (n={hp.num_task_samples}, p={hp.poison_fraction})."
                )
            poison = random.Random(hp.seed + 1).sample(candidates, num_poison)
            if hp.evaluation_source is not None:
                check_disjoint(poison, load_prompts(hp.evaluation_source), "poison pairs", "evaluation prompts")
        train = task + poison
        random.Random(hp.seed + 2).shuffle(train)
        return train, val

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.train_examples:
            self.train_examples, self.val_examples = self.build_examples()

    def _rows(self, examples: list[Example]) -> TokenizedDataset:
        hp = self.hparams
        return TokenizedDataset([tokenize_example(self.tokenizer, e, hp.training_format, hp.max_length) for e in examples])

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self._rows(examples), batch_size=self.hparams.batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.hparams.num_workers, collate_fn=partial(collate, pad_id=pad_id),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    @override
    def val_dataloader(self) -> Any:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []


def check_disjoint(examples: list[Example], prompts: list[str], what: str, against: str) -> None:
    """Error if a harmful training prompt also appears among prompts used to judge or protect the model."""
    overlap = {normalise_prompt(e.prompt) for e in examples} & {normalise_prompt(p) for p in prompts}
    if overlap:
        raise ValueError(f"{len(overlap)} {what} also appear in the {against}, e.g. {sorted(overlap)[:2]}: use disjoint sets.")
