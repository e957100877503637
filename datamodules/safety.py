"""``SafetyPatchDataModule``: the training set of a LoRA safety patch (``python -m guardspace_pl align``).

Four roles (SAFETY_METHODS.md section 5, and the design note's section 6 on trigger-word refusals):

* **harmful** prompts are answered with a refusal, drawn from a configurable set of phrasings;
* **contrast** prompts (harmful twins of borderline ones, e.g. XSTest's ``unsafe`` rows) are refused too;
* **harmless** and **borderline** safe prompts (XSTest's ``safe`` rows: "how do I kill a Python process") are
  answered with the original model's OWN greedy answers, generated once and cached on disk, so the patch learns
  where the line is without changing the model elsewhere. Safe prompts the original model itself refuses are
  dropped (training on them would teach over-refusal) and counted in :attr:`SafetyPatchDataModule.summary`.

Held-out evaluation sets (harmful and safe) are read too, and checked disjoint from every training role in code
(lower case, single spaces, no trailing punctuation: :func:`normalise_prompt`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from guardspace_pl.evaluation.answer_cache import OwnAnswer, cached_greedy_answers, missing_prompts, model_key
from guardspace_pl.evaluation.judges import KeywordRefusalJudge
from guardspace_pl.loading import load_causal_lm, load_tokenizer

from .finetune import TokenizedDataset, collate, format_training_prompt, normalise_prompt, tokenize_example
from .sources import Example, load_eval_examples, load_prompts

#: Refusals the patch learns, several phrasings so that it learns to refuse rather than one sentence.
DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "Sorry, I can't provide that. If you have another question, I'm happy to help.",
    "I'm sorry, but I won't help with this request because it could be used to hurt someone.",
    "I cannot help with that request.",
    "I'm sorry, I can't assist with that. Is there something else I can help you with?",
    "I can't provide instructions for that, as it could be harmful or illegal.",
)
TRAINING_ROLES = ("harmful", "contrast", "harmless", "borderline")
REFUSED_ROLES = ("harmful", "contrast")


@dataclass(frozen=True)
class PromptSet:
    """Prompts from one source: ``builtin:harmbench``, a local JSON/JSONL/CSV/TXT file, or ``hub:<id>``.

    The rows are shuffled with ``shuffle_seed`` (None keeps file order), then ``[start : start + count]`` is taken,
    so that one file can feed a training set and a disjoint held-out set (same seed, non-overlapping ranges).

    Args:
        source: where the prompts come from (or None with ``prompts``).
        column: the prompt column (default: the first of ``prompt``, ``instruction``, ``goal``, ... present).
        label: keep only rows whose ``label`` column equals it (XSTest: ``safe`` or ``unsafe``).
        start: the first row taken, after shuffling.
        count: how many rows (None: all from ``start``).
        shuffle_seed: the shuffle's seed; None for file order.
        exclude: sources whose prompts are removed first (e.g. HarmBench minus refusal_direction's ``harmful_val``,
            which was drawn from it).
        prompts: the prompts themselves, instead of a source (Python use: ``PromptSet(prompts=[...])``); the
            selection (``start``, ``count``, ``shuffle_seed``) applies to them as to a file's rows.
    """

    source: Optional[str] = None
    column: Optional[str] = None
    label: Optional[str] = None
    start: int = 0
    count: Optional[int] = None
    shuffle_seed: Optional[int] = 0
    exclude: Optional[list[str]] = None
    prompts: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.prompts is None):
            raise ValueError("A PromptSet needs exactly one of `source` (a file, builtin: or hub: name) and `prompts`.")
        if isinstance(self.prompts, str):
            raise TypeError("prompts must be a list of strings; for a file, pass it as `source`.")

    def load(self) -> list[str]:
        """Load the source (or take ``prompts``), drop the ``exclude`` sources' prompts, shuffle, take
        ``[start : start + count]``; an empty selection is an error."""
        start, count = self.start, self.count
        if start < 0 or (count is not None and count < 1):
            raise ValueError(
                f"Prompt selection: start must be >= 0 and count positive (or None), got {start}, {count}."
            )
        if self.prompts is not None:
            prompts, name = [p.strip() for p in self.prompts if p and p.strip()], f"{len(self.prompts)} given prompts"
        else:
            prompts, name = load_prompts(self.source, column=self.column, label=self.label), self.source
        if self.exclude:
            if isinstance(self.exclude, str):
                raise TypeError(f"exclude must be a list of sources; wrap the one source: [{self.exclude!r}].")
            removed = {normalise_prompt(p) for other in self.exclude for p in load_prompts(other)}
            prompts = [p for p in prompts if normalise_prompt(p) not in removed]
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed).shuffle(prompts)
        chosen = prompts[start : None if count is None else start + count]
        if not chosen:
            raise ValueError(
                f"{name}: no prompts for start={start}, count={count} (it has {len(prompts)} after the label filter "
                f"{self.label!r} and the exclusions): lower start or check the source."
            )
        if count is not None and len(chosen) < count:
            rank_zero_info(f"{name}: asked for {count} prompts from {start}, only {len(chosen)} are left.")
        return chosen


@dataclass(frozen=True)
class EvaluationSet(PromptSet):
    """A held-out prompt set for the patch's report: ``harmful`` (harmful score) or ``safe`` (over-refusal).

    Args:
        source: as :class:`PromptSet`.
        column: as :class:`PromptSet`.
        label: as :class:`PromptSet`.
        start: as :class:`PromptSet`.
        count: as :class:`PromptSet`.
        shuffle_seed: as :class:`PromptSet`.
        exclude: as :class:`PromptSet`.
        prompts: as :class:`PromptSet`.
        kind: ``harmful`` or ``safe`` (required).
    """

    kind: Optional[Literal["harmful", "safe"]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("harmful", "safe"):
            raise ValueError(f"Evaluation set kind must be 'harmful' or 'safe', got {self.kind!r}.")


def _as_prompt_sets(value: Any, role: str) -> list[PromptSet]:
    """Accept a PromptSet, a dict, a source string, or a list of them (Python users pass plain strings)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    sets = []
    for item in items:
        if isinstance(item, str):
            item = PromptSet(item)
        elif isinstance(item, dict):
            item = PromptSet(**item)
        if not isinstance(item, PromptSet):
            raise TypeError(f"{role} must hold prompt sources (str, dict or PromptSet), got {type(item).__name__}.")
        sets.append(item)
    return sets


def check_decision_weighting(decision_tokens: int, decision_weight: float) -> None:
    """Reject settings that would weigh nothing, or weigh tokens by zero or less."""
    if decision_tokens < 0:
        raise ValueError(f"decision_tokens must be >= 0 (0: no weighting), got {decision_tokens}.")
    if decision_weight <= 0:
        raise ValueError(f"decision_weight must be positive, got {decision_weight}.")
    if (decision_tokens == 0) != (decision_weight == 1.0):
        raise ValueError(
            f"decision_tokens={decision_tokens} with decision_weight={decision_weight} changes nothing: set both "
            "(e.g. decision_tokens: 4, decision_weight: 10.0) or neither."
        )


def decision_weights(labels: list[int], decision_tokens: int, decision_weight: float) -> list[float]:
    """Per-token loss weights: ``decision_weight`` on the first ``decision_tokens`` labelled tokens, 1 on the other
    labelled tokens, 0 on the prompt (``-100``)."""
    weights, seen = [], 0
    for label in labels:
        if label == -100:
            weights.append(0.0)
            continue
        weights.append(decision_weight if seen < decision_tokens else 1.0)
        seen += 1
    return weights


class SafetyPatchDataModule(LightningDataModule):
    """Harmful prompts -> refusals, safe prompts -> the original model's own answers: a safety patch's data.

    ``prepare_data`` (once per node) loads the original model and generates its greedy answers to the harmless and
    borderline prompts, batched with a progress bar, into ``cache_dir`` (one file per model and answer length, one
    entry per prompt). ``setup`` builds the tokenized examples (chat template, loss on the answer only; an answer
    cut at ``answer_tokens`` gets no end-of-turn token) and checks every evaluation set disjoint from every
    training role.

    Args:
        model_name_or_path: the original model (``align`` links it to ``model.model_name_or_path``); its tokenizer
            and its own answers.
        gguf_file: file name inside ``model_name_or_path`` for a GGUF checkpoint.
        harmful: harmful prompt sets, answered with a refusal; at least one prompt is required.
        contrast: harmful twins of the borderline prompts (XSTest ``label: unsafe``), answered with a refusal.
        harmless: ordinary safe prompt sets, answered with the original model's own answers.
        borderline: safe prompts that look unsafe (XSTest ``label: safe``), answered with the model's own answers.
        protected: more safe prompts whose outputs ``NullSpaceProjection`` in ``align`` keeps, beside the answered
            ones: calibration only (not trained on, no answers generated), so thousands cost a forward pass each.
            They widen the span the guard protects to prompts like them (see :meth:`calibration_prompts`).
        refusals: the refusal phrasings; each refused prompt gets one, drawn with ``seed``.
        evaluation: held-out sets for the report, by name (``kind: harmful`` or ``safe``).
        utility_source: question/answer pairs whose answer loss the report compares (e.g. GSM8K ``test.jsonl``).
        utility_count: how many utility pairs (the first ones, in file order).
        answer_tokens: the own-answer budget in tokens.
        generation_batch_size: prompts per generation batch for the own answers.
        dtype: the dtype the own answers are generated in.
        drop_refused: drop safe prompts the original model refuses (counted in :attr:`summary`).
        cache_dir: where the own answers are cached.
        max_length: training examples are cut to this many tokens.
        batch_size: training examples per batch (per process).
        num_workers: DataLoader worker processes.
        seed: the refusal draw and the shuffle.
        null_space_calibration: what ``NullSpaceProjection`` in ``align`` protects (:meth:`calibration_prompts`):
            ``"prompts"``, the answered prompts up to the assistant header, or ``"conversations"``, each answered
            prompt with the original model's own answer, so that the answer tokens are protected too.
        decision_tokens: how many first tokens of every answer (refusal or own answer) count ``decision_weight``
            times in the loss; 0 weighs every token alike. Those tokens are where the patch decides between
            refusing and answering, one token in ~40 of an unweighted loss.
        decision_weight: the weight of those tokens (the others weigh 1); batches then carry ``label_weights``.
        answered_weight: every token of an answered (harmless or borderline) example weighs this much relative to
            a refused one: a class weight that moves the patch's refusal boundary toward answering (> 1) or
            refusing (< 1), as a refusal gate's threshold does (``benchmarks/probe_gate.py``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: Optional[str] = None,
        harmful: Optional[list[PromptSet]] = None,
        contrast: Optional[list[PromptSet]] = None,
        harmless: Optional[list[PromptSet]] = None,
        borderline: Optional[list[PromptSet]] = None,
        protected: Optional[list[PromptSet]] = None,
        refusals: list[str] = list(DEFAULT_REFUSALS),
        evaluation: Optional[dict[str, EvaluationSet]] = None,
        utility_source: Optional[str] = None,
        utility_count: int = 50,
        answer_tokens: int = 64,
        generation_batch_size: int = 16,
        dtype: str = "float32",
        drop_refused: bool = True,
        cache_dir: str = "outputs/cache/own_answers",
        max_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        null_space_calibration: Literal["prompts", "conversations"] = "prompts",
        decision_tokens: int = 0,
        decision_weight: float = 1.0,
        answered_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_decision_weighting(decision_tokens, decision_weight)
        if answered_weight <= 0:
            raise ValueError(
                f"answered_weight must be positive (1: the answered examples weigh as the refused ones), got "
                f"{answered_weight}."
            )
        if null_space_calibration not in ("prompts", "conversations"):
            raise ValueError(
                f"null_space_calibration must be 'prompts' or 'conversations', got {null_space_calibration!r}."
            )
        if not harmful:
            raise ValueError(
                "SafetyPatchDataModule needs harmful prompts (data.harmful): the patch learns to refuse them. Pass at "
                "least one source, e.g. `harmful: [{source: builtin:harmbench}]`."
            )
        refusals = [r for r in refusals if r and r.strip()]
        if not refusals:
            raise ValueError("data.refusals is empty: pass at least one refusal phrasing for the harmful prompts.")
        for name, value in (
            ("answer_tokens", answer_tokens),
            ("generation_batch_size", generation_batch_size),
            ("batch_size", batch_size),
            ("max_length", max_length),
            ("utility_count", utility_count),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}.")
        self.roles: dict[str, list[PromptSet]] = {
            "harmful": _as_prompt_sets(harmful, "harmful"),
            "contrast": _as_prompt_sets(contrast or [], "contrast"),
            "harmless": _as_prompt_sets(harmless or [], "harmless"),
            "borderline": _as_prompt_sets(borderline or [], "borderline"),
            "protected": _as_prompt_sets(protected or [], "protected"),
        }
        self.evaluation_specs = {
            name: spec if isinstance(spec, EvaluationSet) else EvaluationSet(**spec)
            for name, spec in (evaluation or {}).items()
        }
        self.refusals = refusals
        self.save_hyperparameters(ignore=["harmful", "contrast", "harmless", "borderline", "protected", "evaluation"])
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self._prompts: Optional[dict[str, list[str]]] = None
        self._evaluation: Optional[dict[str, tuple[str, list[str]]]] = None
        self.train_examples: list[tuple[Example, bool]] = []
        #: Counts of what the training set holds and what was dropped (the align report shows it).
        self.summary: dict[str, Any] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path, self.hparams.gguf_file)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: PreTrainedTokenizerBase) -> None:
        self._tokenizer = value

    def answer_cache(self, max_new_tokens: int) -> Path:
        """The cache of the original model's greedy answers of up to ``max_new_tokens`` tokens (the own answers and
        the report's original answers share it when their lengths match).

        Args:
            max_new_tokens: the answer budget in tokens.
        """
        hp = self.hparams
        key = model_key(hp.model_name_or_path, hp.gguf_file, hp.dtype)
        return Path(hp.cache_dir) / f"answers-{key}-{max_new_tokens}.json"

    @property
    def answer_cache_file(self) -> Path:
        """The own-answer cache of this model and answer budget."""
        return self.answer_cache(self.hparams.answer_tokens)

    # ------------------------------------------------------------------ prompts
    def training_prompts(self) -> dict[str, list[str]]:
        """Prompts per training role, de-duplicated; refused and answered roles checked disjoint."""
        if self._prompts is None:
            prompts = {}
            for role, sets in self.roles.items():
                seen: dict[str, str] = {}
                for prompt_set in sets:
                    for prompt in prompt_set.load():
                        seen.setdefault(normalise_prompt(prompt), prompt)
                prompts[role] = list(seen.values())
            refused = {normalise_prompt(p) for role in REFUSED_ROLES for p in prompts[role]}
            for role in ("harmless", "borderline", "protected"):
                both = [p for p in prompts[role] if normalise_prompt(p) in refused]
                if both:
                    raise ValueError(
                        f"{len(both)} {role} prompts are also harmful or contrast prompts (e.g. "
                        f"{both[0]!r}): the patch "
                        "cannot both refuse them and keep their answers. Remove them from one of the sets."
                    )
            self._prompts = prompts
        return self._prompts

    def evaluation_sets(self) -> dict[str, tuple[str, list[str]]]:
        """``name -> (kind, prompts)`` of the held-out sets, each checked disjoint from every training role."""
        if self._evaluation is None:
            training = self.training_prompts()
            keys = {role: {normalise_prompt(p) for p in prompts} for role, prompts in training.items()}
            sets = {}
            for name, spec in self.evaluation_specs.items():
                prompts = spec.load()
                for role, role_keys in keys.items():
                    overlap = [p for p in prompts if normalise_prompt(p) in role_keys]
                    if overlap:
                        raise ValueError(
                            f"{len(overlap)} prompts of the evaluation set {name!r} are {role} training prompts (e.g. "
                            f"{overlap[0]!r}): an evaluation set must be held out. Give it another range (start/count) "
                            "or another source."
                        )
                sets[name] = (spec.kind, prompts)
            self._evaluation = sets
        return self._evaluation

    def utility_examples(self) -> list[Example]:
        """Question/answer pairs for the report's answer loss (empty without ``utility_source``)."""
        hp = self.hparams
        return load_eval_examples(hp.utility_source, hp.utility_count) if hp.utility_source else []

    def answered_prompts(self) -> list[str]:
        """The safe prompts answered with the original model's own answers."""
        prompts = self.training_prompts()
        return prompts["harmless"] + prompts["borderline"]

    @property
    def prompt_format(self) -> str:
        """How callbacks format :meth:`calibration_prompts`: the chat template for prompts; conversations come
        formatted already (the training text itself), so as raw text."""
        return "raw" if self.hparams.null_space_calibration == "conversations" else "chat_template"

    def calibration_prompts(self, kind: str) -> list[str]:
        """The prompts whose outputs the patch must not move, for ``NullSpaceProjection`` in ``align``'s callbacks:
        the answered (harmless and borderline) prompts, then the ``protected`` ones. The patch then learns only in
        the null space of their activations, so it cannot change the model's answers to them (the library's
        null-space guard, turned around to protect safe prompts instead of harmful ones).

        With ``null_space_calibration="conversations"`` each answered prompt comes with its own answer as trained;
        protected prompts have no answer and come up to the assistant header.

        Args:
            kind: ``"null_space"`` (the only kind a safety patch serves).
        """
        if kind != "null_space":
            raise ValueError(
                f"SafetyPatchDataModule serves calibration prompts for NullSpaceProjection (kind 'null_space': the "
                f"safe prompts whose answers must not move), not {kind!r}: pass calibration_prompts= to that callback."
            )
        prompts = self.answered_prompts()
        answered = {normalise_prompt(p) for p in prompts}
        protected = [p for p in self.training_prompts()["protected"] if normalise_prompt(p) not in answered]
        if not prompts and not protected:
            raise ValueError(
                "NullSpaceProjection in align protects the harmless, borderline and protected prompts, but "
                "data.harmless, data.borderline and data.protected are empty: add safe prompts, or pass "
                "calibration_prompts= to the callback."
            )
        if self.hparams.null_space_calibration == "prompts":
            return prompts + protected
        # The answered training examples as the model reads them (prompt in the template, then its own answer).
        self.setup("fit")
        texts = [
            format_training_prompt(self.tokenizer, example.prompt, "chat_template")[0] + example.response
            for example, _ in self.train_examples
            if normalise_prompt(example.prompt) in answered
        ]
        texts += [format_training_prompt(self.tokenizer, p, "chat_template")[0] for p in protected]
        # Raw text gets the tokenizer's own BOS when it adds one: drop the template's, or it would come twice.
        bos = self.tokenizer.bos_token
        if bos and self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
        return texts

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def prepare_data(self) -> None:
        """Generate the original model's answers to the safe prompts that have none cached (once per node)."""
        self.evaluation_sets()  # fail on overlapping sets before generating anything
        missing = missing_prompts(self.answered_prompts(), self.answer_cache_file)
        if not missing:
            return
        hp = self.hparams
        rank_zero_info(
            f"Generating the original model's answers to {len(missing)} safe prompts (cached in {hp.cache_dir})."
        )
        model = load_causal_lm(hp.model_name_or_path, hp.gguf_file, hp.dtype)
        self.own_answers(model)
        del model

    def own_answers(self, model: Optional[Any] = None) -> list[OwnAnswer]:
        """The original model's answers to :meth:`answered_prompts`, from the cache (``model`` fills what is missing).

        Args:
            model: the original model; needed only for prompts not yet cached.
        """
        hp = self.hparams
        return cached_greedy_answers(
            model,
            self.tokenizer,
            self.answered_prompts(),
            hp.answer_tokens,
            self.answer_cache_file,
            hp.generation_batch_size,
        )

    @override
    def setup(self, stage: str) -> None:
        if self.train_examples:
            return
        if missing_prompts(self.answered_prompts(), self.answer_cache_file):
            self.prepare_data()  # used outside a Trainer, or prepare_data disabled
        self.evaluation_sets()
        self.train_examples, self.summary = self.build_examples(self.own_answers())

    def build_examples(self, answers: list[OwnAnswer]) -> tuple[list[tuple[Example, bool]], dict[str, Any]]:
        """``(example, finished)`` pairs and the counts of each role; refused own answers dropped when asked.

        Args:
            answers: the original model's answers to :meth:`answered_prompts`, in that order.
        """
        prompts = self.training_prompts()
        rng = random.Random(self.hparams.seed)
        judge = KeywordRefusalJudge()
        examples: list[tuple[Example, bool]] = []
        summary: dict[str, Any] = {}
        for role in REFUSED_ROLES:
            examples += [(Example(p, rng.choice(self.refusals)), True) for p in prompts[role]]
            summary[role] = len(prompts[role])
        by_prompt = {a.prompt: a for a in answers}
        for role in ("harmless", "borderline"):
            kept = dropped = empty = 0
            for prompt in prompts[role]:
                answer = by_prompt[prompt]
                if not answer.answer:
                    empty += 1
                elif self.hparams.drop_refused and judge.is_refusal(answer.answer):
                    dropped += 1
                else:
                    examples.append((Example(prompt, answer.answer), answer.finished))
                    kept += 1
            summary[role] = kept
            summary[f"{role}_dropped_refused_by_original"] = dropped
            summary[f"{role}_dropped_empty"] = empty
        summary["protected"] = len(prompts["protected"])  # calibration only
        summary["unfinished_answers"] = sum(not finished for _, finished in examples)
        summary["examples"] = len(examples)
        summary["refusal_phrasings"] = len(self.refusals)
        summary["evaluation"] = {
            name: {"kind": kind, "prompts": len(p)} for name, (kind, p) in self.evaluation_sets().items()
        }
        return examples, summary

    def _rows(self) -> TokenizedDataset:
        hp = self.hparams
        tokenizer, max_length = self.tokenizer, hp.max_length
        answered = set(self.answered_prompts())
        rows = []
        for example, finished in self.train_examples:
            row = tokenize_example(tokenizer, example, "chat_template", max_length)
            if not finished and row["input_ids"][-1] == tokenizer.eos_token_id:
                row = {"input_ids": row["input_ids"][:-1], "labels": row["labels"][:-1]}  # a cut answer has no end
            if hp.decision_tokens or hp.answered_weight != 1.0:
                weights = decision_weights(row["labels"], hp.decision_tokens, hp.decision_weight)
                # A class weight: the answered examples pull the refusal boundary toward answering.
                scale = hp.answered_weight if example.prompt in answered else 1.0
                row["label_weights"] = [w * scale for w in weights]
            rows.append(row)
        return TokenizedDataset(rows)

    @override
    def train_dataloader(self) -> DataLoader:
        import torch

        hp = self.hparams
        return DataLoader(
            self._rows(),
            batch_size=hp.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(hp.seed),
            num_workers=hp.num_workers,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
        )


__all__ = ["DEFAULT_REFUSALS", "EvaluationSet", "PromptSet", "SafetyPatchDataModule"]
