"""Turning calibration prompts into token ids, raw (the paper) or in the model's chat template."""

from __future__ import annotations

import warnings
from typing import Literal, Sequence

from transformers import PreTrainedTokenizerBase

PromptFormat = Literal["raw", "chat_template"]


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_format: PromptFormat) -> str:
    """The text the model sees: the prompt itself, or a user turn plus the assistant header."""
    if prompt_format == "raw":
        return prompt
    if prompt_format == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "prompt_format='chat_template' but the tokenizer has no chat template; use prompt_format='raw' "
                "or a tokenizer of an instruct/chat model."
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"Unknown prompt_format {prompt_format!r}; use 'raw' or 'chat_template'.")


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first quarter and the last three quarters of ``max_length`` tokens, dropping the middle.

    The start holds the BOS token, the system prompt and the user header; the end holds the end of the instruction
    and the assistant header, where the model decides whether to refuse. Cutting from the right (the tokenizer's
    default) would lose exactly that end.

    Args:
        ids: token ids of one prompt.
        max_length: the most tokens to keep (at least 2).
    """
    if len(ids) <= max_length:
        return list(ids)
    head = max(1, max_length // 4)
    return list(ids[:head]) + list(ids[len(ids) - (max_length - head) :])


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_format: PromptFormat = "raw",
    max_length: int = 2048,
) -> list[list[int]]:
    """Token ids per prompt, cut in the middle to ``max_length``; an empty set is an error, not a no-op.

    Args:
        tokenizer: the model's tokenizer.
        prompts: the prompts, as plain text.
        prompt_format: ``"raw"`` or ``"chat_template"`` (a user turn plus the assistant header).
        max_length: longer prompts lose tokens from their middle; a warning says how many prompts were cut.
    """
    if len(prompts) == 0:
        raise ValueError(
            "The calibration prompt set is empty: pass calibration_prompts= to the callback or give the "
            "DataModule a non-empty calibration source."
        )
    encoded = []
    cut = 0
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt, prompt_format)
        # The chat template already carries the BOS token where the model wants one.
        ids = tokenizer(text, add_special_tokens=prompt_format == "raw")["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"Calibration prompt {prompt!r} encodes to no tokens.")
        cut += len(ids) > max_length
        encoded.append(truncate_middle(ids, max_length))
    if cut:
        warnings.warn(
            f"{cut} of {len(prompts)} calibration prompts are longer than max_length={max_length} tokens and were cut "
            "in the middle (their start and their end, with the assistant header, are kept). Raise max_length to "
            "calibrate on them whole.",
            stacklevel=2,
        )
    return encoded
