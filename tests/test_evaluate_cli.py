"""``python -m guardspace_pl test``: generation-based evaluation end to end on a tiny model and real eval sets."""

import json
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForSequenceClassification

from guardspace_pl.cli import main
from guardspace_pl.evaluation import BEAVERTAILS_CATEGORIES, read_results
from guardspace_pl.testing import byte_tokenizer, save_tiny_llama


def eval_config(tmp_path: Path, shared_data: Path, model: dict, trainer: dict) -> Path:
    (tmp_path / "calibration.txt").write_text("build a bomb\nsteal a car\nhack a bank\n")
    config = {
        "seed_everything": 0,
        "model": {
            "model_name_or_path": save_tiny_llama(str(tmp_path / "tiny")),
            "lora_rank": 4,
            "eval_max_new_tokens": 4,
            **model,
        },
        "data": {
            "task": "builtin:arithmetic",
            "num_task_samples": 8,
            "batch_size": 4,
            "max_length": 256,
            "calibration_source": str(tmp_path / "calibration.txt"),
            "harmful_eval_source": str(shared_data / "refusal_direction" / "harmful_val.json"),
            "safe_eval_source": str(shared_data / "xstest" / "xstest_prompts.csv"),
            "task_eval_source": str(shared_data / "gsm8k" / "test.jsonl"),
            "eval_count": 3,
            "eval_batch_size": 2,
        },
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            **trainer,
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_test_subcommand_writes_results_json(tmp_path, shared_data, capsys):
    results = tmp_path / "out" / "results.json"
    main(["test", "--config", str(eval_config(tmp_path, shared_data, {"results_path": str(results)}, {}))])
    rows = {r["metric"]: r for r in json.loads(results.read_text())}
    assert set(rows) == {"harmful_score", "over_refusal", "gsm8k_accuracy", "gsm8k_loss"}
    assert rows["harmful_score"]["judge"] == "keyword" and rows["harmful_score"]["n"] == 3
    assert rows["over_refusal"]["judge"] == "keyword" and rows["over_refusal"]["n"] == 3
    assert rows["gsm8k_accuracy"]["judge"] is None and rows["gsm8k_accuracy"]["n"] == 3
    for metric in ("harmful_score", "over_refusal", "gsm8k_accuracy"):
        assert 0.0 <= rows[metric]["value"] <= 100.0
    assert rows["gsm8k_loss"]["value"] > 0  # a random model's loss on the reference answers
    printed = capsys.readouterr().out
    table_row = next(line for line in printed.splitlines() if line.startswith("harmful_score"))
    assert table_row.split()[:2] == ["harmful_score", "keyword"] and table_row.split()[-1] == "3"
    assert str(results) in printed


# `test` with both safety sources null has no safety batches (the point of that call); and the test run's own
# ModelCheckpoint writes elsewhere than the one the checkpoint came from, which Lightning mentions.
@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero", "ignore:The dirpath has changed")
def test_test_after_fit_restores_the_checkpoint(tmp_path, shared_data):
    """``test --ckpt_path`` evaluates trained weights; without it, the untrained model: the answer loss differs."""
    config = eval_config(tmp_path, shared_data, {"learning_rate": 1e-2, "warmup_ratio": 0.0}, {"max_steps": 2})
    main([
        "fit", "--config", str(config),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
    ])
    checkpoint = next((tmp_path / "ckpt").glob("*.ckpt"))
    main([
        "test", "--config", str(config),
        "--ckpt_path", str(checkpoint), "--model.results_path", str(tmp_path / "trained.json"),
    ])
    main(["test", "--config", str(config), "--data.safe_eval_source", "null", "--data.harmful_eval_source", "null"])
    trained = {r.metric: r for r in read_results(tmp_path / "trained.json")}
    untrained = {r.metric: r for r in read_results(tmp_path / "results.json")}  # the default <log_dir>/results.json
    assert set(untrained) == {"gsm8k_accuracy", "gsm8k_loss"}
    assert trained["gsm8k_loss"].value != pytest.approx(untrained["gsm8k_loss"].value, rel=1e-4)


def test_beaver_dam_judge_is_named_in_the_results(tmp_path, shared_data):
    # A tiny randomly initialised 14-category classifier stands in for beaver-dam-7b (no network here).
    judge_dir = tmp_path / "judge"
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=259, num_labels=len(BEAVERTAILS_CATEGORIES), pad_token_id=258, bos_token_id=256, eos_token_id=257,
    )
    LlamaForSequenceClassification(config).save_pretrained(judge_dir)
    byte_tokenizer().save_pretrained(judge_dir)
    results = tmp_path / "results.json"
    model = {"judge": "beaver-dam", "judge_model": str(judge_dir), "results_path": str(results)}
    main(["test", "--config", str(eval_config(tmp_path, shared_data, model, {})), "--data.task_eval_source", "null"])
    rows = {r.metric: r for r in read_results(results)}
    assert rows["harmful_score"].judge == "beaver-dam"
    assert rows["over_refusal"].judge == "keyword"  # over-refusal is always keyword-judged: never mixed


def test_test_without_evaluation_sets_is_a_clear_error(tmp_path, shared_data):
    config = eval_config(tmp_path, shared_data, {}, {})
    args = ["--data.harmful_eval_source", "null", "--data.safe_eval_source", "null", "--data.task_eval_source", "null"]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        main(["test", "--config", str(config), *args])
