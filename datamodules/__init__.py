"""DataModules: task sets mixed with harmful data, calibration prompts for the GuardSpace callbacks, evaluation
streams."""

from guardspace_pl.datamodules.finetune import (
    EvaluationPrompts,
    GuardSpaceDataModule,
    check_disjoint,
    collate,
    format_training_prompt,
    normalise_prompt,
    tokenize_example,
)
from guardspace_pl.datamodules.safety import DEFAULT_REFUSALS, EvaluationSet, PromptSet, SafetyPatchDataModule
from guardspace_pl.datamodules.sources import (
    Example,
    demo_arithmetic,
    load_eval_examples,
    load_prompts,
    load_task_examples,
)
from guardspace_pl.datamodules.streaming import RankBalancedStream, ResumableSampler, build_stream, examples_per_rank

__all__ = [
    "DEFAULT_REFUSALS",
    "EvaluationSet",
    "PromptSet",
    "SafetyPatchDataModule",
    "EvaluationPrompts",
    "Example",
    "GuardSpaceDataModule",
    "RankBalancedStream",
    "ResumableSampler",
    "build_stream",
    "check_disjoint",
    "collate",
    "demo_arithmetic",
    "examples_per_rank",
    "format_training_prompt",
    "load_eval_examples",
    "load_prompts",
    "load_task_examples",
    "normalise_prompt",
    "tokenize_example",
]
