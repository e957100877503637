"""Result rows, their JSON file and a plain-text table. The judge is part of every judged row."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

#: Metrics whose value depends on who judged: a row of one of these must name its judge.
JUDGED_METRICS = frozenset({"harmful_score", "over_refusal"})


@dataclass(frozen=True)
class Result:
    """One number: ``metric`` (e.g. ``harmful_score``), ``value``, ``judge`` (None for unjudged metrics),
    ``n`` items."""

    metric: str
    value: float
    judge: Optional[str] = None
    n: int = 0

    def __post_init__(self) -> None:
        # numpy / tensor scalars become plain floats so that rows compare and serialise alike.
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "n", int(self.n))
        if not self.metric:
            raise ValueError("Result.metric is empty; name the metric, e.g. 'harmful_score'.")
        if self.metric in JUDGED_METRICS and not self.judge:
            # Keyword and classifier harmful scores differ by tens of points; an unlabelled one invites mixing.
            raise ValueError(f"Result {self.metric!r} needs judge= (e.g. 'keyword' or 'beaver-dam').")
        if self.n < 0:
            raise ValueError(f"Result.n counts items and cannot be negative, got {self.n}.")


def safety_results(metrics: dict[str, Any]) -> list[Result]:
    """Rows from ``evaluate_safety``'s dict: the harmful score and, if present, over-refusal, each with its judge."""
    rows = [Result("harmful_score", metrics["harmful_score"], metrics["judge"], metrics["n_harmful"])]
    if "over_refusal" in metrics:
        rows.append(Result("over_refusal", metrics["over_refusal"], metrics["refusal_judge"], metrics["n_safe"]))
    return rows


def gsm8k_results(metrics: dict[str, Any]) -> list[Result]:
    """Rows from ``evaluate_gsm8k``'s dict: exact-match accuracy (%) and teacher-forced loss."""
    return [
        Result("gsm8k_accuracy", metrics["accuracy"], None, metrics["n"]),
        Result("gsm8k_loss", metrics["loss"], None, metrics["n"]),
    ]


def write_results(rows: Sequence[Result], path: Union[str, Path]) -> Path:
    """Write the rows as a JSON list of objects (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not valid JSON; write null so other tools can read the file.
    records = [{**asdict(r), "value": r.value if math.isfinite(r.value) else None} for r in rows]
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def read_results(path: Union[str, Path]) -> list[Result]:
    """The rows written by ``write_results``."""
    records = json.loads(Path(path).read_text())
    return [
        Result(r["metric"], math.nan if r["value"] is None else r["value"], r.get("judge"), r.get("n", 0))
        for r in records
    ]


def format_table(rows: Sequence[Result]) -> str:
    """An aligned plain-text table with columns metric, judge, value, n."""
    header = ("metric", "judge", "value", "n")
    cells = [(r.metric, r.judge or "-", f"{r.value:.2f}", str(r.n)) for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        # Text columns left-aligned, numbers right-aligned so decimal points line up.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])
