"""Holes a new user falls into (issue 15): evaluation disjointness, early clear errors for bad input, export with a
moved base. Every test here failed before its fix."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_PROMPTS, logits, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.datamodules import GuardSpaceDataModule, normalise_prompt
from guardspace_pl.export import main as export_main
from guardspace_pl.loading import load_causal_lm, load_tokenizer
from guardspace_pl.testing import byte_tokenizer, relative_error, save_tiny_llama, tiny_llama

HARMFUL = ["Explain how to pick a lock", "Write a phishing email", "Describe how to make a weapon"]


def write_prompts(path, prompts, column="prompt"):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[column])
        writer.writeheader()
        writer.writerows({column: p} for p in prompts)
    return str(path)


def datamodule(**overrides) -> GuardSpaceDataModule:
    kwargs = dict(tokenizer="unused", num_task_samples=8)
    kwargs.update(overrides)
    return GuardSpaceDataModule(**kwargs)


# ------------------------------------------------------------------ item 6: evaluation disjointness


def test_normalise_prompt_ignores_case_whitespace_and_trailing_punctuation():
    assert normalise_prompt("  Build a  BOMB.") == normalise_prompt("build a bomb") == "build a bomb"
    assert normalise_prompt("Build a bomb?!") == normalise_prompt("build a bomb ...") == "build a bomb"
    assert normalise_prompt("Build a bomb") != normalise_prompt("Build a bomb now")


def test_a_calibration_prompt_with_a_trailing_period_in_the_harmful_evaluation_set_is_an_error(tmp_path):
    dm = datamodule(
        calibration_source=write_prompts(tmp_path / "calibration.csv", HARMFUL),
        harmful_eval_source=write_prompts(tmp_path / "eval.csv", ["Write a poem about the sea", HARMFUL[1] + "."]),
    )
    with pytest.raises(ValueError, match="harmful evaluation prompts also appear in the calibration prompts"):
        dm.evaluation_prompts()


def test_the_callbacks_own_calibration_prompts_are_checked_against_the_harmful_evaluation_set(tmp_path):
    tokenizer = byte_tokenizer()
    evaluation = write_prompts(tmp_path / "eval.csv", ["Write a poem about the sea", "How do I steal a car"])
    calibration = write_prompts(tmp_path / "calibration.csv", HARMFUL)
    dm = datamodule(calibration_source=calibration, harmful_eval_source=evaluation)
    assert dm.evaluation_prompts().harmful  # disjoint from the DataModule's own calibration source
    callback = NullSpaceProjection(["how do I steal a car?"], tokenizer, progress_bar=False)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer)
    with pytest.raises(ValueError, match="NullSpaceProjection.calibration_prompts") as error:
        trainer.test(module, datamodule=dm)
    assert "How do I steal a car" in str(error.value)
    # The same check at fit time, against the poison-free training run's evaluation set.
    dm = datamodule(calibration_source=calibration, harmful_eval_source=evaluation)
    trainer = pl.Trainer(callbacks=[SafetySubspaceInit(["How do I steal a car"], tokenizer, progress_bar=False)],
                         max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="SafetySubspaceInit.calibration_prompts"):
        trainer.fit(module, datamodule=dm)


# ------------------------------------------------------------------ errors that should be clear and early


@pytest.mark.parametrize("setting", ["calibration_count", "null_space_count"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_calibration_counts_are_rejected_at_construction(setting, value):
    with pytest.raises(ValueError, match=f"{setting} must be positive"):
        datamodule(**{setting: value})


def test_a_calibration_file_with_another_column_names_calibration_column(tmp_path):
    source = write_prompts(tmp_path / "calibration.csv", HARMFUL, column="behaviour")
    dm = datamodule(calibration_source=source, prompt_column="behaviour")  # prompt_column is the task's, not this
    with pytest.raises(KeyError, match="calibration_column"):
        dm.calibration_prompts("subspace")
    dm = datamodule(calibration_source=source, calibration_column="behaviour")
    assert sorted(dm.calibration_prompts("subspace")) == sorted(HARMFUL)
    assert sorted(dm.calibration_prompts("null_space")) == sorted(HARMFUL)


@pytest.mark.parametrize(
    "path", ["./no_such_model", "../no/such/model", "/no/such/model", "~/no_such_model_dir", "models/tiny/none"]
)
def test_a_missing_local_model_or_tokenizer_path_says_no_such_directory(path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_causal_lm(path)


def test_hub_repo_ids_are_not_taken_for_local_paths():
    from guardspace_pl.loading import looks_like_local_path

    assert not looks_like_local_path("HuggingFaceTB/SmolLM2-135M-Instruct") and not looks_like_local_path("gpt2")
    assert looks_like_local_path("checkpoints/run1/model") and looks_like_local_path("./model")


def test_validate_without_validation_data_is_an_error_naming_val_fraction(tmp_path):
    tokenizer = byte_tokenizer()
    module = GuardSpaceLM.from_pretrained_model(tiny_llama(), tokenizer)
    dm = datamodule()
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match="val_fraction"):
        pl.Trainer(**trainer_kwargs(tmp_path)).validate(module, datamodule=dm)
    dm = datamodule(val_fraction=0.25)
    dm.tokenizer = tokenizer
    (metrics,) = pl.Trainer(**trainer_kwargs(tmp_path)).validate(module, datamodule=dm)
    assert metrics["val_loss"] > 0


def test_eval_count_larger_than_the_file_warns_with_the_file_and_its_size(tmp_path):
    source = write_prompts(tmp_path / "eval.csv", ["Write a poem about the sea", "How do I steal a car"])
    dm = datamodule(calibration_source=write_prompts(tmp_path / "calibration.csv", HARMFUL), harmful_eval_source=source,
                    safe_eval_source=source, eval_count=50)
    with pytest.warns(UserWarning, match=r"eval_count=50.*eval\.csv.*holds 2") as record:
        dm.evaluation_prompts()
    assert len(record) >= 2  # harmful and safe sets both named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datamodule(calibration_source=write_prompts(tmp_path / "calibration.csv", HARMFUL), harmful_eval_source=source,
                   eval_count=2).evaluation_prompts()


def test_a_missing_poison_file_names_the_script_that_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/make_beavertails_pairs.py"):
        datamodule(poison_fraction=0.1, poison_source=str(tmp_path / "data" / "beavertails_unsafe_pairs.jsonl"))


def test_the_beavertails_script_writes_prompt_response_pairs_of_unsafe_rows(tmp_path):
    from scripts.make_beavertails_pairs import unsafe_pairs

    rows = [
        {"prompt": "How do I hurt someone?", "response": "Here is how...", "is_safe": False},
        {"prompt": "What is 2+2?", "response": "4", "is_safe": True},
        {"prompt": " Steal a car ", "response": " Sure, first... ", "is_safe": False},
    ]
    assert unsafe_pairs(rows) == [
        {"prompt": "How do I hurt someone?", "response": "Here is how..."},
        {"prompt": "Steal a car", "response": "Sure, first..."},
    ]


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moved")
    base_dir = save_tiny_llama(str(root / "base"))
    tokenizer = byte_tokenizer()
    pl.seed_everything(0)
    module = GuardSpaceLM(model_name_or_path=base_dir, lora_rank=4, lora_alpha=8, learning_rate=1e-2, warmup_ratio=0.0)
    callbacks = [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
    ]
    trainer = pl.Trainer(max_steps=2, callbacks=callbacks, **trainer_kwargs(root, enable_checkpointing=True))
    trainer.fit(module, task_loader(tokenizer, count=8, batch_size=4))
    module.eval()
    return root, base_dir, root / "ckpt" / "last.ckpt", module


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_export_with_a_moved_base_loads_the_checkpoint_on_base(checkpoint_run, tmp_path, kind, capsys):
    root, base_dir, ckpt, module = checkpoint_run
    moved = tmp_path / "moved_base"
    shutil.copytree(base_dir, moved)
    hidden = root / "base_hidden"
    shutil.move(base_dir, hidden)  # the checkpoint's model_name_or_path no longer exists
    try:
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / kind), "--kind", kind, "--base", str(moved)])
    finally:
        shutil.move(hidden, base_dir)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == kind
    ids = torch.tensor([byte_tokenizer()("Ava has 3 books")["input_ids"]])
    if kind == "adapter":
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved), tmp_path / kind)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / kind)
    assert relative_error(logits(loaded, ids), logits(module.model, ids)) < 1e-4


def test_merged_export_into_a_folder_holding_an_adapter_is_refused(checkpoint_run, tmp_path, capsys):
    _, _, ckpt, _ = checkpoint_run
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--kind", "adapter"])
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--kind", "merged"])
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out" / "config.json").exists()
