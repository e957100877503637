"""Every command the README shows runs, in the README's order, in a scratch copy of its working directory.

Commands come from ``bash`` blocks tagged ``<!-- readme-commands -->`` and from README command 1's last step
(the part after the install). The test only appends overrides that shrink sizes (``SMALL``), never other flags,
so a command that stops working in the README fails here.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: Command prefix -> arguments appended to make it CI-sized (last occurrence of a flag wins in both CLIs).
SMALL = {
    "python -m guardspace_pl demo": (
        "--patch_harmful 4 --calibration 8 --poison 2 --task_examples 6 --eval_per_source 2 --eval_task 2 "
        "--patch_epochs 1 --attack_epochs 1 --answer_tokens 8"
    ),
    "python -m guardspace_pl fit --config configs/demo.yaml": (
        "--trainer.max_steps 2 --data.num_task_samples 24 --data.calibration_count 8 --trainer.val_check_interval 1"
    ),
    "python -m guardspace_pl test": "--data.eval_count 2 --model.eval_max_new_tokens 4",
    "python -m guardspace_pl align": (
        "--trainer.max_steps 2 --report.enabled false --data.answer_tokens 8 "
        "--data.harmless '[{source: ../shared/data/refusal_direction/harmless_train.json, count: 8}]' "
        "--data.borderline '[{source: ../shared/data/xstest/xstest_prompts.csv, label: safe, count: 4}]'"
    ),
    "python -m guardspace_pl repair --method lssf": "--anchor-count 4",
}


def readme_commands() -> list[str]:
    setup = re.search(r"```bash\n# 1\..*?\n(.*?)\n", README, re.S).group(1)
    commands = [setup.split(" && ")[-1]]  # README command 1 after the install
    for block in re.findall(r"<!-- readme-commands -->\s*```bash\n(.*?)```", README, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_the_readme_shows_its_commands():
    commands = readme_commands()
    assert commands[0] == "python -m guardspace_pl demo"
    for expected in (
        "fit --config configs/demo.yaml",
        "test --config",
        "guardspace_pl.export",
        "repair --method safelora",
    ):
        assert any(expected in c for c in commands), expected


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    # A checkout beside ../shared/data, as the configs expect (the data from GUARDSPACE_DATA when it is set).
    checkout = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", checkout / "configs")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(require_shared_data().resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in readme_commands():
        small_settings = (small for prefix, small in SMALL.items() if command.startswith(prefix))
        extra = "" if "--print_config" in command else next(small_settings, "")
        args = shlex.split(command) + shlex.split(extra)
        assert args[0] == "python"
        result = subprocess.run(
            [sys.executable, *args[1:]], cwd=checkout, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        if command.startswith("python -m guardspace_pl demo"):
            assert "fine-tuned: plain LoRA" in result.stdout and "keyword judge" in result.stdout
        if command.startswith("python -m guardspace_pl test"):
            assert "harmful_score" in result.stdout and "over_refusal" in result.stdout
