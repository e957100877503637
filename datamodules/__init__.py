"""DataModules: task sets mixed with harmful data, and calibration prompts for the GuardSpace callbacks."""

from guardspace_pl.datamodules.finetune import GuardSpaceDataModule, collate, tokenize_example
from guardspace_pl.datamodules.sources import Example, demo_arithmetic, load_prompts, load_task_examples

__all__ = ["Example", "GuardSpaceDataModule", "collate", "demo_arithmetic", "load_prompts", "load_task_examples", "tokenize_example"]
