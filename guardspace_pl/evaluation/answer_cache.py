"""A model's own greedy answers, generated once per prompt and kept on disk.

The safety patch trains on the original model's answers to harmless prompts (so that it changes as little as
possible there), and its report compares the original model's answers with the patched model's. Both read the
same cache: one JSON file per model and generation length, one entry per prompt, so adding prompts generates
only the new ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from guardspace_pl.evaluation.generation import generate_responses
from guardspace_pl.io import write_json


@dataclass(frozen=True)
class OwnAnswer:
    """A greedy answer; ``finished`` when the model stopped by itself within the token budget."""

    prompt: str
    answer: str
    finished: bool


def model_key(model_name_or_path: str, gguf_file: Optional[str] = None, dtype: str = "float32") -> str:
    """A short key for a model: its name, file and dtype, plus size and modification time of a local folder's files.

    A model retrained into the same folder gets a new key, so its cached answers are not reused.

    Args:
        model_name_or_path: hub id, local folder or ``builtin:...`` name.
        gguf_file: the GGUF file inside the folder, if any.
        dtype: the dtype the answers are generated in.
    """
    parts = [model_name_or_path, str(gguf_file), dtype]
    path = Path(model_name_or_path)
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.is_file() and file.suffix in (".safetensors", ".bin", ".gguf", ".json"):
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_greedy_answers(
    model: Optional[nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    cache_file: Path,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[OwnAnswer]:
    """The model's greedy answers (chat template) to ``prompts``, generated only for prompts not yet in ``cache_file``.

    One token more than ``max_new_tokens`` is generated to tell an answer that ended from one that was cut: a cut
    answer is stored truncated to ``max_new_tokens`` tokens with ``finished=False`` (train on it without EOS).

    Args:
        model: the model; may be None when every prompt is already cached.
        tokenizer: its tokenizer.
        prompts: the prompts, in the order the answers are returned.
        max_new_tokens: the answer budget in tokens.
        cache_file: the JSON file for this model and budget (see :func:`model_key`).
        batch_size: prompts per generation batch.
        show_progress: show a progress bar over generation batches.
    """
    cache_file = Path(cache_file)
    stored = (
        {row["prompt"]: OwnAnswer(**row) for row in json.loads(cache_file.read_text())} if cache_file.exists() else {}
    )
    missing = list(dict.fromkeys(p for p in prompts if p not in stored))
    if missing:
        if model is None:
            raise ValueError(f"{len(missing)} prompts have no cached answer in {cache_file} and no model was given.")
        answers = generate_responses(
            model,
            tokenizer,
            missing,
            max_new_tokens=max_new_tokens + 1,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        for prompt, answer in zip(missing, answers):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            finished = len(ids) <= max_new_tokens
            text = answer if finished else _cut(tokenizer, ids, max_new_tokens)
            stored[prompt] = OwnAnswer(prompt, text.strip(), finished)
        write_json(cache_file, [asdict(row) for row in stored.values()])
    return [stored[p] for p in prompts]


def _cut(tokenizer: PreTrainedTokenizerBase, ids: list[int], max_tokens: int) -> str:
    """The text of at most ``max_tokens`` tokens: a cut inside a multi-byte character decodes to a replacement
    character that re-encodes longer, so shorten until the text itself fits."""
    keep = max_tokens
    while True:
        text = tokenizer.decode(ids[:keep], skip_special_tokens=True).strip()
        if keep == 0 or len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return text
        keep -= 1


def missing_prompts(prompts: Sequence[str], cache_file: Path) -> list[str]:
    """The prompts that ``cache_file`` holds no answer for.

    Args:
        prompts: the prompts.
        cache_file: a file written by :func:`cached_greedy_answers`.
    """
    cache_file = Path(cache_file)
    stored = {row["prompt"] for row in json.loads(cache_file.read_text())} if cache_file.exists() else set()
    return [p for p in prompts if p not in stored]


__all__ = ["OwnAnswer", "cached_greedy_answers", "missing_prompts", "model_key"]
