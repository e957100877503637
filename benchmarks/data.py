"""Where the real data sets (AdvBench, GSM8K, XSTest, refusal_direction) are read from: one setting for the tests and
the benchmarks, the environment variable ``GUARDSPACE_DATA`` (default ``../shared/data`` next to the repository)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "GUARDSPACE_DATA"
#: set to 1 (as CI does) to make a test that needs the data fail, instead of skip, when the data is missing
REQUIRE_DATA_ENV = "GUARDSPACE_REQUIRE_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HOW_TO_GET = (
    f"set {DATA_ENV} to a folder holding advbench/, gsm8k/, xstest/ and refusal_direction/ (the layout and the "
    "public sources of each set are in the README's data section; the default is ../shared/data next to the "
    "repository)"
)


def data_dir() -> Path:
    """The data folder: ``$GUARDSPACE_DATA`` when set, else ``../shared/data`` next to the repository."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else DEFAULT_DATA_DIR


def data_required() -> bool:
    """Whether a missing data folder must fail (CI) rather than skip."""
    return os.environ.get(REQUIRE_DATA_ENV, "") not in ("", "0")
