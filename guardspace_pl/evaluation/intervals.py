"""Confidence intervals for rates measured on a finite prompt set."""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate, as fractions in [0, 1].

    Better than the normal approximation near 0 and 1, where harmful scores and refusal rates live: 0 of 100 gives
    (0, 0.037), not (0, 0).

    Args:
        successes: how many prompts counted (e.g. judged harmful).
        trials: how many prompts were judged.
        confidence: the interval's coverage (0.95 for 95 %).
    """
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials={trials}], got {successes}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or all successes the bound is exactly 0 or 1 (rounding would leave 1e-17).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


__all__ = ["wilson_interval"]
