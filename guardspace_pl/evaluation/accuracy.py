"""Task accuracy: GSM8K final-answer exact match and label matching for SST2/AGNews."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

# A number as GSM8K writes it: optional sign and dollar sign, thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
    """Canonical form of a numeric string: no ``$``/commas/trailing ``.``, ``18.00`` -> ``18``; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        # "18", "18.0" and "18.00" are the same answer; keep integers free of exponent notation.
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The final answer: the first number after the last ``####`` if present, else the last number in the text."""
    if "####" in text:
        # References (and models trained on them) put the answer after "####"; chain-of-thought numbers before
        # it are intermediate results.
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        return normalize_number(match.group()) if match else None
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def gsm8k_exact_match(prediction: str, reference: str) -> bool:
    """True if the model output's final number equals the reference's ``####`` answer."""
    gold = extract_gsm8k_answer(reference)
    if gold is None:
        raise ValueError(
            f"The reference answer has no number to compare against: {reference[-80:]!r}; pass GSM8K's 'answer' "
            "field (ending in '#### <number>')."
        )
    return extract_gsm8k_answer(prediction) == gold


def label_match(prediction: str, labels: Sequence[str]) -> Optional[str]:
    """The label (as given in ``labels``) whose word appears first in the prediction, case-insensitively; None if none.

    E.g. ``label_match("Positive, not negative.", ["negative", "positive"]) == "positive"``.
    """
    if len(labels) == 0:
        raise ValueError("labels is empty; pass the task's label names, e.g. ['negative', 'positive'].")
    best: Optional[tuple[int, str]] = None
    for label in labels:
        # Word boundaries so that "positive" is not found inside "nonpositive"; labels like "Sci/Tech" are escaped.
        found = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", prediction, flags=re.IGNORECASE)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), label)
    return best[1] if best else None
