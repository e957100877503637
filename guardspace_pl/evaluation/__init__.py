"""Evaluation: harmfulness judges, task accuracy, greedy generation, lm-eval, and result tables."""

from guardspace_pl.evaluation.accuracy import (
    extract_gsm8k_answer,
    gsm8k_exact_match,
    label_match,
    normalize_number,
)
from guardspace_pl.evaluation.generation import (
    answer_token_losses,
    evaluate_gsm8k,
    evaluate_safety,
    generate_from_texts,
    generate_responses,
    length_order,
    teacher_forced_loss,
    unwrap_model,
)
from guardspace_pl.evaluation.judges import (
    BEAVERTAILS_CATEGORIES,
    BEAVERTAILS_QA_TEMPLATE,
    REFUSAL_PHRASES,
    BeaverDamJudge,
    Judge,
    KeywordRefusalJudge,
    harmful_score,
    normalize_apostrophes,
)
from guardspace_pl.evaluation.lm_eval_integration import GSM8K_LOCAL_TASK, gsm8k_local_task_dir, run_lm_eval
from guardspace_pl.evaluation.results import (
    JUDGED_METRICS,
    Result,
    format_table,
    gsm8k_results,
    read_results,
    safety_results,
    write_results,
)

__all__ = [
    "answer_token_losses",
    "generate_from_texts",
    "length_order",
    "BEAVERTAILS_CATEGORIES",
    "BEAVERTAILS_QA_TEMPLATE",
    "GSM8K_LOCAL_TASK",
    "JUDGED_METRICS",
    "REFUSAL_PHRASES",
    "BeaverDamJudge",
    "Judge",
    "KeywordRefusalJudge",
    "Result",
    "evaluate_gsm8k",
    "evaluate_safety",
    "extract_gsm8k_answer",
    "format_table",
    "generate_responses",
    "gsm8k_exact_match",
    "gsm8k_local_task_dir",
    "gsm8k_results",
    "harmful_score",
    "label_match",
    "normalize_apostrophes",
    "normalize_number",
    "read_results",
    "run_lm_eval",
    "safety_results",
    "teacher_forced_loss",
    "unwrap_model",
    "write_results",
]
