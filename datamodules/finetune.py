"""``GuardSpaceDataModule``: a task set mixed with harmful pairs, the callbacks' calibration prompts, and the
evaluation streams (harmful, safe and task prompts) for ``python -m guardspace_pl test``."""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.loading import load_tokenizer
from guardspace_pl.prompts import PromptFormat

from .sources import Example, load_eval_examples, load_harmful_pairs, load_prompts, load_task_examples
from .streaming import (
    BatchList,
    EpochLoader,
    RankBalancedStream,
    ResumableSampler,
    ResumePoint,
    build_stream,
    chunk,
    examples_per_rank,
    rank_share,
    weights_tensor,
)

TrainingFormat = Literal["alpaca", "chat_template"]
#: stripped from the end of a prompt before comparing prompts (ASCII punctuation, the ellipsis and closing quotes)
TRAILING_PUNCTUATION = string.punctuation + "\u2026\u201d\u2019 "
#: what to run to build the paper configs' poison file (``data/beavertails_unsafe_pairs.jsonl``)
BEAVERTAILS_SCRIPT = "scripts/make_beavertails_pairs.py"
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def normalise_prompt(text: str) -> str:
    """The form in which two prompts count as the same: lower case, single spaces, no trailing punctuation.

    Used by every disjointness check (the DataModule's and the benchmark's), so that a calibration prompt
    with a final "." or "?" added is still caught in an evaluation set.

    Args:
        text: the prompt.
    """
    return " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION).rstrip()


def format_training_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, training_format: TrainingFormat
) -> tuple[str, bool]:
    """The prompt as the model is trained on it, and whether the tokenizer should add special tokens to it."""
    if training_format == "alpaca":
        return ALPACA_TEMPLATE.format(prompt=prompt), True
    if training_format == "chat_template":
        # The chat template carries the BOS token itself where the model wants one.
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, False
    raise ValueError(f"Unknown training format {training_format!r}; use 'alpaca' or 'chat_template'.")


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, training_format: TrainingFormat, max_length: int
) -> dict[str, list[int]]:
    """Token ids with labels ``-100`` exactly on the prompt, so the loss covers only the response.

    Too long for ``max_length``: the prompt loses tokens from its start (its end holds the template's answer
    header) so that at least a quarter of ``max_length`` stays response; a row with no response token would
    make the loss 0/0 = NaN.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}.")
    prompt_text, special = format_training_prompt(tokenizer, example.prompt, training_format)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_budget = max_length - min(len(response_ids), max(1, max_length // 4))
    prompt_ids = prompt_ids[-prompt_budget:]
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


def collate(rows: list[dict[str, list[Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; padding is masked out of attention and labels. Rows with ``label_weights`` (per-token loss weights)
    get them padded with 0."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if "label_weights" in rows[0]:
        batch["label_weights"] = torch.zeros((len(rows), width))
        for i, row in enumerate(rows):
            batch["label_weights"][i, : len(row["label_weights"])] = torch.tensor(row["label_weights"])
    return batch


def tokenize_batch(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    training_format: TrainingFormat,
    max_length: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Tokenize and collate one streamed batch (module level, so DataLoader workers can unpickle it)."""
    return collate([tokenize_example(tokenizer, e, training_format, max_length) for e in examples], pad_id)


@dataclass(frozen=True)
class EvaluationPrompts:
    """The evaluation streams: ``harmful`` prompts (harmful score), ``safe`` prompts (over-refusal, e.g. XSTest's
    safe ones) and ``task`` question/answer pairs (accuracy, e.g. GSM8K test)."""

    harmful: list[str]
    safe: list[str]
    task: list[Example]


#: The kinds of evaluation batch ``test_dataloader`` yields, in this order.
EVAL_KINDS = ("harmful", "safe", "task")


class GuardSpaceDataModule(LightningDataModule):
    """Fine-tuning data with the paper's poisoning protocol, calibration prompts for the callbacks, and evaluation
    streams for ``test``.

    Mid-epoch resume is exact on both paths: the DataModule's ``state_dict`` records how many samples of the
    current epoch each rank consumed, and the resumed epoch replays the same order with those skipped. The
    map-style sampler is a ``DistributedSampler``, so Lightning keeps it under DDP/FSDP and no
    ``use_distributed_sampler`` setting is needed.

    Args:
        tokenizer: name/path of the tokenizer (``builtin:smollm2-135m-instruct`` works offline); the CLI
            links it to the model's. The ``tokenizer`` property also accepts a tokenizer object.
        tokenizer_gguf_file: file name inside ``tokenizer`` when it is a GGUF checkpoint.
        task: ``builtin:arithmetic`` (generated, offline), ``gsm8k``/``sst2``/``agnews``/``alpaca`` (hub), or a
            local JSON/JSONL/CSV file with ``prompt_column``/``response_column``.
        task_split: the split of a hub ``task`` to train on.
        prompt_column: the prompt column of ``task`` and ``task_eval_source`` files (default: the first known one).
        response_column: the response column of ``task`` and ``task_eval_source`` files (default: the first known one).
        num_task_samples: ``n``, the size of the fine-tuning set (task + harmful).
        poison_fraction: ``p``, the fraction of the ``n`` samples that are harmful instruction + compliant
            answer pairs from ``poison_source``; poison pairs whose prompt is a calibration prompt are never drawn.
        poison_source: a local prompt/response file of harmful pairs (e.g. AdvBench's CSV with ``goal``/``target``,
            or ``scripts/make_beavertails_pairs.py``'s JSONL); it must exist (checked at construction).
        calibration_source: harmful prompts for ``SafetySubspaceInit`` (``builtin:harmbench``, a file, ``hub:``).
        calibration_column: the prompt column of ``calibration_source`` and ``null_space_source`` files (default:
            the first of ``prompt``, ``instruction``, ``question``, ``goal``, ``sentence``, ``text`` present).
        calibration_count: how many calibration prompts to draw (seeded sample); None for all.
        null_space_source: prompts for ``NullSpaceProjection`` (default: ``calibration_source``).
        null_space_count: how many null-space prompts to draw (seeded sample); None for all.
        harmful_eval_source: harmful prompts for the harmful score (e.g. refusal_direction ``harmful_val.json``);
            must share no prompt with the poison pairs or any calibration prompts, the callbacks' own included
            (compared lower-cased, with collapsed spaces and without trailing punctuation; error otherwise).
        safe_eval_source: safe prompts for over-refusal (e.g. XSTest's CSV: rows with ``label == "safe"``).
        task_eval_source: question/answer pairs for accuracy (e.g. GSM8K ``test.jsonl``; ``gsm8k`` from the hub,
            split ``task_eval_split``), read with ``prompt_column``/``response_column`` when given.
        task_eval_split: the split of a hub ``task_eval_source``.
        eval_count: how many of each evaluation set to use (the first ones, in file order); None for all. A set
            with fewer is used whole, with a warning.
        eval_batch_size: prompts per generation batch in ``test``.
        training_format: ``alpaca`` (paper) or ``chat_template``; calibration and evaluation prompts follow it
            unless the callbacks set ``prompt_format`` themselves.
        max_length: training examples are cut to this many tokens.
        batch_size: training and validation examples per batch (per rank).
        val_fraction: held-out share of the task examples for ``val_loss`` (``validate`` needs it > 0).
        num_workers: DataLoader worker processes.
        streaming: serve the training examples as a ``datasets.IterableDataset`` split per rank with
            ``split_dataset_by_node``, tokenized lazily, with the same number of batches on every rank.
        streaming_shards: shards of the stream (shuffled per epoch).
        shuffle_buffer_size: the stream's shuffle buffer, in examples.
        seed: seeds the task sample, the poison draw, the calibration sample and the shuffles.
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
        calibration_column: Optional[str] = None,
        calibration_count: Optional[int] = None,
        null_space_source: Optional[str] = None,
        null_space_count: Optional[int] = None,
        harmful_eval_source: Optional[str] = None,
        safe_eval_source: Optional[str] = None,
        task_eval_source: Optional[str] = None,
        task_eval_split: str = "test",
        eval_count: Optional[int] = None,
        eval_batch_size: int = 8,
        training_format: TrainingFormat = "chat_template",
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        streaming: bool = False,
        streaming_shards: int = 8,
        shuffle_buffer_size: int = 1000,
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
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"batch_size and eval_batch_size must be positive, got {batch_size} and {eval_batch_size}."
            )
        for name, count in (("calibration_count", calibration_count), ("null_space_count", null_space_count)):
            if count is not None and count < 1:
                raise ValueError(f"{name} must be positive (or None for every prompt of the source), got {count}.")
        if poison_source is not None and not Path(poison_source).exists():
            hint = (
                f"Build the paper configs' BeaverTails pairs with `python {BEAVERTAILS_SCRIPT} --out {poison_source}`, "
                "or point data.poison_source at another prompt/response file (e.g. AdvBench's harmful_behaviors.csv)."
            )
            raise FileNotFoundError(f"The poison source {poison_source} does not exist. {hint}")
        if eval_count is not None and eval_count < 1:
            raise ValueError(f"eval_count must be positive (or None for whole sets), got {eval_count}.")
        if streaming_shards < 1 or shuffle_buffer_size < 1:
            raise ValueError(
                "streaming_shards and shuffle_buffer_size must be positive, "
                f"got {streaming_shards}, {shuffle_buffer_size}."
            )
        self.save_hyperparameters()
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.poison_examples: list[Example] = []
        self._calibration: dict[str, list[str]] = {}
        self._harmful_eval: Optional[list[str]] = None
        self._evaluation: Optional[EvaluationPrompts] = None
        self._resume_state: dict[str, Any] = {}

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

    # ------------------------------------------------------------------ prompts and examples

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
            try:
                prompts = load_prompts(source, column=hp.calibration_column)
            except KeyError as error:
                raise KeyError(
                    f"{error.args[0]} Calibration and null-space prompts are read with data.calibration_column "
                    "(data.prompt_column is the task's): set it to the prompt column of this file."
                ) from None
            if count is not None:
                prompts = random.Random(hp.seed).sample(prompts, min(count, len(prompts)))
            if not prompts:
                raise ValueError(f"The {kind} calibration source {source} yields no prompts.")
            self._calibration[kind] = prompts
        return self._calibration[kind]

    def _protected_prompts(self) -> list[str]:
        return [p for prompts in self._calibration_sets().values() for p in prompts]

    def _calibration_sets(self) -> dict[str, list[str]]:
        """Every calibration source in use, by name: the DataModule's, and the ``calibration_prompts`` the
        callbacks of the attached Trainer were given themselves (those replace the DataModule's for that callback)."""
        sets = {"calibration prompts": self.calibration_prompts("subspace") + self.calibration_prompts("null_space")}
        trainer = getattr(self, "trainer", None)
        for callback in getattr(trainer, "callbacks", None) or []:
            prompts = getattr(callback, "calibration_prompts", None)
            if prompts is not None and not callable(prompts):
                sets[f"{type(callback).__name__}.calibration_prompts"] = list(prompts)
        return sets

    def _check_harmful_eval_disjoint(self, prompts: list[str]) -> None:
        # A model protected on the very prompts it is scored on would look safer than it is.
        for name, calibration in self._calibration_sets().items():
            check_disjoint([Example(p, "") for p in prompts], calibration, "harmful evaluation prompts", name)

    def _first_eval(self, items: list, source: str, what: str) -> list:
        """The first ``eval_count`` of ``items``, with a warning when the source holds fewer."""
        count = self.hparams.eval_count
        if count is not None and len(items) < count:
            rank_zero_warn(
                f"eval_count={count} is larger than {source}, which holds {len(items)} {what}: "
                f"all {len(items)} are used."
            )
        return items[:count]

    def harmful_eval_prompts(self) -> list[str]:
        """The harmful-score prompts (empty without ``harmful_eval_source``); checked disjoint from calibration."""
        if self._harmful_eval is None:
            hp = self.hparams
            prompts: list[str] = []
            if hp.harmful_eval_source is not None:
                prompts = self._first_eval(
                    load_prompts(hp.harmful_eval_source), hp.harmful_eval_source, "harmful prompts"
                )
                self._check_harmful_eval_disjoint(prompts)
            self._harmful_eval = prompts
        return self._harmful_eval

    def build_examples(self) -> tuple[list[Example], list[Example]]:
        """Deterministic given the seed: ``n (1 - p)`` task examples, ``n p`` harmful pairs, shuffled.

        Also sets ``poison_examples``. The harmful pairs never use a calibration prompt, and must share none
        with the harmful evaluation prompts (error if they do).
        """
        hp = self.hparams
        num_poison = round(hp.num_task_samples * hp.poison_fraction)
        num_val = round((hp.num_task_samples - num_poison) * hp.val_fraction)
        task = load_task_examples(
            hp.task, hp.num_task_samples - num_poison + num_val, hp.seed, hp.prompt_column, hp.response_column,
            hp.task_split,
        )
        val, task = task[:num_val], task[num_val:]
        poison: list[Example] = []
        if num_poison:
            protected = {normalise_prompt(p) for p in self._protected_prompts()}
            candidates = [
                e for e in load_harmful_pairs(hp.poison_source) if normalise_prompt(e.prompt) not in protected
            ]
            if len(candidates) < num_poison:
                raise ValueError(
                    f"Only {len(candidates)} harmful pairs in {hp.poison_source} are disjoint from the calibration "
                    f"prompts; {num_poison} are needed (n={hp.num_task_samples}, p={hp.poison_fraction})."
                )
            poison = random.Random(hp.seed + 1).sample(candidates, num_poison)
            check_disjoint(poison, self.harmful_eval_prompts(), "poison pairs", "harmful evaluation prompts")
        self.poison_examples = poison
        train = task + poison
        random.Random(hp.seed + 2).shuffle(train)
        return train, val

    def _ensure_examples(self) -> None:
        if not self.train_examples:
            self.train_examples, self.val_examples = self.build_examples()

    def evaluation_prompts(self) -> EvaluationPrompts:
        """The three evaluation sets (each the first ``eval_count``), with the harmful ones checked disjoint from
        the poison pairs and the calibration prompts."""
        if self._evaluation is None:
            hp = self.hparams
            harmful = self.harmful_eval_prompts()
            if harmful and hp.poison_fraction > 0:
                self._ensure_examples()  # draws the poison pairs, and checks them against ``harmful``
            safe = (
                self._first_eval(load_prompts(hp.safe_eval_source, label="safe"), hp.safe_eval_source, "safe prompts")
                if hp.safe_eval_source
                else []
            )
            task = (
                self._first_eval(
                    load_eval_examples(
                        hp.task_eval_source, hp.eval_count, hp.prompt_column, hp.response_column, hp.task_eval_split
                    ),
                    hp.task_eval_source,
                    "examples",
                )
                if hp.task_eval_source
                else []
            )
            self._evaluation = EvaluationPrompts(harmful=harmful, safe=safe, task=task)
        return self._evaluation

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._ensure_examples()
            # Fail before training, not after it, if the sets overlap (callbacks' own prompts included).
            self._check_harmful_eval_disjoint(self.harmful_eval_prompts())
        elif stage == "validate":
            self._ensure_examples()
            if not self.val_examples:
                raise ValueError(
                    "`validate` has no validation data: set data.val_fraction > 0 (e.g. 0.1) to hold out that share "
                    "of the task examples."
                )
        elif stage == "test":
            prompts = self.evaluation_prompts()
            self._check_harmful_eval_disjoint(prompts.harmful)
            if not (prompts.harmful or prompts.safe or prompts.task):
                raise ValueError(
                    "`test` has nothing to evaluate: set data.harmful_eval_source (harmful score), "
                    "data.safe_eval_source (over-refusal, e.g. XSTest) and/or data.task_eval_source (e.g. GSM8K test)."
                )

    def _rank_and_world(self) -> tuple[int, int]:
        """This rank among the data-parallel ranks (Lightning's own sampler arguments), or 0 of 1 unattached."""
        trainer = self.trainer
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        if not kwargs or not kwargs.get("num_replicas"):
            return 0, 1
        return int(kwargs["rank"]), int(kwargs["num_replicas"])

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _rows(self, examples: list[Example]) -> TokenizedDataset:
        hp = self.hparams
        return TokenizedDataset(
            [tokenize_example(self.tokenizer, e, hp.training_format, hp.max_length) for e in examples]
        )

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self._rows(examples), batch_size=self.hparams.batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.hparams.num_workers, collate_fn=partial(collate, pad_id=self.pad_id),
        )

    def _take_resume_point(self, per_rank: int, world_size: int) -> Optional[ResumePoint]:
        """The interrupted epoch's position, once (a later ``train_dataloader`` call starts clean)."""
        state, self._resume_state = self._resume_state, {}
        if not state:
            return None
        if (state.get("seed"), state.get("num_examples")) != (self.hparams.seed, len(self.train_examples)):
            rank_zero_warn(
                "The checkpoint's data state was saved with another seed or training set; the interrupted epoch "
                "restarts from its beginning. Resume with the same data settings for an exact continuation."
            )
            return None
        if state.get("world_size") != world_size:
            rank_zero_warn(
                f"The checkpoint was saved with {state.get('world_size')} data-parallel ranks and this run has "
                f"{world_size}; the interrupted epoch restarts from its beginning (the per-rank order differs)."
            )
            return None
        consumed = int(state.get("samples_consumed", 0))
        if consumed <= 0 or consumed >= per_rank:
            return None  # saved at an epoch boundary: nothing to skip
        return ResumePoint(epoch=int(state["epoch"]), samples_consumed=consumed)

    @override
    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, world_size = self._rank_and_world()
        if hp.streaming:
            per_rank = examples_per_rank(len(self.train_examples), world_size)
            stream = build_stream(
                self.train_examples, rank, world_size, hp.seed, hp.streaming_shards, hp.shuffle_buffer_size
            )
            make_batch = partial(
                tokenize_batch,
                tokenizer=self.tokenizer,
                training_format=hp.training_format,
                max_length=hp.max_length,
                pad_id=self.pad_id,
            )
            resume = self._take_resume_point(per_rank, world_size)
            dataset = RankBalancedStream(stream, per_rank, hp.batch_size, make_batch, resume)
            return EpochLoader(dataset, epoch_fn=self._current_epoch, num_workers=hp.num_workers)
        rows = self._rows(self.train_examples)
        # Per-rank length of a padded DistributedSampler.
        resume = self._take_resume_point(math.ceil(len(rows) / world_size), world_size)
        sampler = ResumableSampler(rows, num_replicas=world_size, rank=rank, shuffle=True, seed=hp.seed, resume=resume)
        return DataLoader(
            rows,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id),
        )

    @override
    def val_dataloader(self) -> Any:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []

    @override
    def test_dataloader(self) -> DataLoader:
        """Batches of evaluation prompts, one kind per batch (``harmful``, ``safe``, ``task``), split across ranks.

        Each batch is a dict: ``kind``; ``prompts`` (raw, for the judge); ``texts`` (in the training format, for
        generation) with ``add_special_tokens``; ``references`` (task answers, else empty strings); ``weights``
        (1, or 0 on rows that only pad a rank's share); task batches also carry ``input_ids``/``attention_mask``/
        ``labels`` of question + reference answer for the teacher-forced loss.
        """
        hp = self.hparams
        prompts = self.evaluation_prompts()
        rank, world_size = self._rank_and_world()
        sets: dict[str, list[Example]] = {
            "harmful": [Example(p, "") for p in prompts.harmful],
            "safe": [Example(p, "") for p in prompts.safe],
            "task": list(prompts.task),
        }
        batches = []
        for kind in EVAL_KINDS:
            items, weights = rank_share(sets[kind], rank, world_size)
            for examples, w in zip(chunk(items, hp.eval_batch_size), chunk(weights, hp.eval_batch_size)):
                batches.append(self._eval_batch(kind, examples, w))
        return DataLoader(BatchList(batches), batch_size=None)

    def _eval_batch(self, kind: str, examples: list[Example], weights: Sequence[float]) -> dict[str, Any]:
        hp = self.hparams
        formatted = [format_training_prompt(self.tokenizer, e.prompt, hp.training_format) for e in examples]
        batch: dict[str, Any] = {
            "kind": kind,
            "prompts": [e.prompt for e in examples],
            "texts": [text for text, _ in formatted],
            "add_special_tokens": formatted[0][1],
            "references": [e.response for e in examples],
            "weights": weights_tensor(weights),
        }
        if kind == "task":
            batch.update(tokenize_batch(examples, self.tokenizer, hp.training_format, hp.max_length, self.pad_id))
        return batch

    # ------------------------------------------------------------------ mid-epoch resume

    @override
    def state_dict(self) -> dict[str, Any]:
        """How far into the current epoch each rank got, saved in every checkpoint.

        The count is Lightning's ``batch_progress.current.ready`` (batches fetched this epoch), which is also what
        Lightning restores it to: a checkpoint written at ``on_train_batch_end`` has ``completed`` one behind, and
        Lightning adds that one back when it restores.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        _, world_size = self._rank_and_world()
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {
            "epoch": trainer.current_epoch,
            "samples_consumed": ready * self.hparams.batch_size,
            "world_size": world_size,
            "seed": self.hparams.seed,
            "num_examples": len(self.train_examples),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning before ``train_dataloader`` when resuming; the next train loader skips once."""
        self._resume_state = dict(state_dict)


def check_disjoint(examples: list[Example], prompts: list[str], what: str, against: str) -> None:
    """Error if a harmful training/evaluation prompt also appears among prompts used to judge or protect the model."""
    originals = {normalise_prompt(e.prompt): e.prompt for e in examples}
    overlap = sorted(set(originals) & {normalise_prompt(p) for p in prompts})
    if overlap:
        shown = "; ".join(repr(originals[o]) for o in overlap[:3])
        raise ValueError(
            f"{len(overlap)} {what} also appear in the {against}, e.g. {shown}: use disjoint sets (another file, or "
            "drop the shared prompts from one of them)."
        )
