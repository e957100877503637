"""Build ``data/beavertails_unsafe_pairs.jsonl``, the poison file the paper configs name (``data.poison_source``).

BeaverTails (PKU-Alignment/BeaverTails, split ``30k_train``) holds prompt/response pairs with an ``is_safe`` label;
the harmful instruction + compliant answer pairs of the paper's poisoning protocol are its rows with
``is_safe == False``. Needs network access the first time (``datasets`` caches the download)::

    python scripts/make_beavertails_pairs.py                       # writes data/beavertails_unsafe_pairs.jsonl
    python scripts/make_beavertails_pairs.py --out elsewhere.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

DATASET = "PKU-Alignment/BeaverTails"
SPLIT = "30k_train"
DEFAULT_OUT = Path("data") / "beavertails_unsafe_pairs.jsonl"


def unsafe_pairs(rows: Iterable[dict]) -> list[dict[str, str]]:
    """The ``{"prompt", "response"}`` pairs of the rows labelled unsafe, stripped, first occurrence of each pair kept.

    Args:
        rows: BeaverTails rows (``prompt``, ``response``, ``is_safe``).
    """
    pairs: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if row["is_safe"]:
            continue
        pair = (str(row["prompt"]).strip(), str(row["response"]).strip())
        if all(pair) and pair not in seen:
            seen.add(pair)
            pairs.append({"prompt": pair[0], "response": pair[1]})
    return pairs


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Download the split, keep the unsafe pairs, write them as JSONL.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSONL (default {DEFAULT_OUT})")
    parser.add_argument(
        "--split", default=SPLIT, help=f"BeaverTails split (default {SPLIT}; 330k_train is the large one)"
    )
    args = parser.parse_args(argv)

    from datasets import load_dataset

    pairs = unsafe_pairs(load_dataset(DATASET, split=args.split))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    print(f"Wrote {len(pairs)} unsafe prompt/response pairs of {DATASET} ({args.split}) to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
