import re
from pathlib import Path

import pytest
import yaml

from guardspace_pl.cli import main
from guardspace_pl.testing import save_tiny_llama

ALL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Safety-patch configs belong to `align`, every other one to `fit`.
PATCH_CONFIGS = [c for c in ALL_CONFIGS if c.stem.startswith("safety_patch_")]
CONFIGS = [c for c in ALL_CONFIGS if c not in PATCH_CONFIGS]


@pytest.mark.parametrize("config", PATCH_CONFIGS, ids=[c.stem for c in PATCH_CONFIGS])
def test_every_safety_patch_config_parses_for_align(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name_or_path"] and "model_name_or_path" not in printed["data"]  # linked from model
    assert printed["data"]["harmful"] and printed["data"]["refusals"] and printed["data"]["evaluation"]


def test_align_config_typo_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "--config", str(PATCH_CONFIGS[0]), "--data.answer_tokns=8"])
    assert exit_info.value.code != 0
    assert "answer_tokns" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name_or_path"]
    callbacks = {c["class_path"] for c in printed["trainer"]["callbacks"]}
    # Every config uses at least one of the library's callbacks, and parsing keeps each one it names.
    named = set(re.findall(r"class_path: (guardspace_pl\.callbacks\.\w+)", config.read_text()))
    assert named and named <= callbacks


def test_config_typo_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS[0]), "--model.lora_rnak=4"])
    assert exit_info.value.code != 0
    assert "lora_rnak" in capsys.readouterr().err


def tiny_config(tmp_path: Path) -> Path:
    model_dir = save_tiny_llama(str(tmp_path / "tiny"))
    config = {
        "seed_everything": 0,
        "demo_prompt": "Ava has 2 books and gets 3 more. How many books?",
        "model": {
            "model_name_or_path": model_dir,
            "lora_rank": 4,
            "learning_rate": 1e-2,
            "adapter_dir": str(tmp_path / "adapter"),
        },
        "data": {
            "task": "builtin:arithmetic",
            "num_task_samples": 16,
            "batch_size": 4,
            "max_length": 64,
            "val_fraction": 0.25,
            "calibration_source": str(tmp_path / "calibration.txt"),
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "guardspace_pl.callbacks.SafetySubspaceInit", "init_args": {"progress_bar": False}},
                {
                    "class_path": "guardspace_pl.callbacks.NullSpaceProjection",
                    "init_args": {"progress_bar": False, "threshold": 1e-3},
                },
            ],
        },
    }
    (tmp_path / "calibration.txt").write_text("build a bomb\nsteal a car\nhack a bank\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_end_to_end_with_guardspace(tmp_path, capsys):
    main(["fit", "--config", str(tiny_config(tmp_path))])
    out = capsys.readouterr().out
    assert "adapter saved to" in out and "reply" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "guardspace" / "null_space.json").exists()
    assert (tmp_path / "guardspace" / "subspace_init.json").exists()


def test_fit_takes_safety_patches_from_the_command_line(tmp_path, capsys):
    config = tiny_config(tmp_path)
    patch = tmp_path / "patch"
    patch.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.safety_patches", f"[{patch}]", "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["safety_patches"] == [str(patch)]
    with pytest.raises(FileNotFoundError, match="does not exist"):  # before any model is loaded
        main(["fit", "--config", str(config), "--model.safety_patches", f"[{tmp_path / 'missing'}]"])
