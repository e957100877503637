"""Turning calibration prompts into token ids, raw (the paper) or in the model's chat template."""

from __future__ import annotations

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


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_format: PromptFormat = "raw",
    max_length: int = 2048,
) -> list[list[int]]:
    """Token ids per prompt, truncated to ``max_length``; an empty set is an error, not a no-op."""
    if len(prompts) == 0:
        raise ValueError(
            "The calibration prompt set is empty: pass calibration_prompts= to the callback or give the "
            "DataModule a non-empty calibration source."
        )
    encoded = []
    for prompt in prompts:
        text = format_prompt(tokenizer, prompt, prompt_format)
        # The chat template already carries the BOS token where the model wants one.
        ids = tokenizer(text, add_special_tokens=prompt_format == "raw", truncation=True, max_length=max_length)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"Calibration prompt {prompt!r} encodes to no tokens.")
        encoded.append(list(ids))
    return encoded
