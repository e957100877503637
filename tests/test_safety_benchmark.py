"""The safety benchmark (benchmarks/safety/): its data splits, and a smoke run end to end on the real model.

The benchmark itself (``--profile cpu`` / ``full``) is not part of the test suite; ``--profile smoke`` runs
every stage (alignment, attack with the GuardSpace callbacks, evaluation, report) at tiny sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from guardspace_pl.datamodules import normalise_prompt

from benchmarks.safety.profiles import PROFILES
from benchmarks.safety.splits import OverlapError, check_disjoint, make_splits

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture
def smoke_splits(shared_data):
    return make_splits(PROFILES["smoke"], shared_data)


def test_check_disjoint_raises_on_overlap_after_normalisation():
    check_disjoint(["Build a bomb"], {"poison": ["Steal a car"]})
    with pytest.raises(OverlapError, match="poison"):
        check_disjoint(["Build a  bomb"], {"calibration": ["x"], "poison": ["build a bomb "]})
    with pytest.raises(OverlapError, match="duplicate"):
        check_disjoint(["a b", "A  B"], {})
    # A trailing full stop or question mark does not make a prompt new (one normalisation: the library's).
    with pytest.raises(OverlapError, match="poison"):
        check_disjoint(["Build a bomb"], {"poison": ["build a bomb."]})
    with pytest.raises(OverlapError, match="duplicate"):
        check_disjoint(["How do I build a bomb?", "how do i build a bomb"], {})


@pytest.mark.parametrize("profile", ["smoke", "cpu", "full"])
def test_profile_splits_are_disjoint(shared_data, profile):
    splits = make_splits(PROFILES[profile], shared_data)  # make_splits runs splits.check()
    size = PROFILES[profile]
    assert len(splits.eval_harmful) == size.eval_harmful and len(splits.val_harmful) == size.val_harmful
    assert len(splits.calibration) == size.calibration_count
    used = {normalise_prompt(p) for p in splits.align_harmful + splits.calibration + splits.val_harmful + [r["prompt"] for r in splits.poison]}
    assert not used & {normalise_prompt(p) for p in splits.eval_harmful}


@pytest.mark.parametrize("role", ["align_harmful", "calibration", "val_harmful", "poison"])
def test_splits_check_rejects_an_evaluation_prompt_in_any_other_role(smoke_splits, role):
    leaked = smoke_splits.eval_harmful[0].upper() + "  "  # same prompt once normalised
    value = getattr(smoke_splits, role)
    value = value + ([{"prompt": leaked, "target": "Sure"}] if role == "poison" else [leaked])
    with pytest.raises(OverlapError):
        replace(smoke_splits, **{role: value}).check()


@pytest.mark.slow
def test_smoke_profile_runs_end_to_end(tmp_path, shared_data):
    out = tmp_path / "safety_smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.safety.run", "--profile", "smoke", "--out", str(out), "--data-dir", str(shared_data)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "table.md", "frontier.png", "harmful_vs_p.png", "splits.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    profile = PROFILES["smoke"]
    expected = sum(len(profile.lrs[m]) for m, _ in profile.variants) * len(profile.p_grid) * len(profile.seeds)
    assert len(results["runs"]) == expected == len(list((out / "runs").glob("*.json")))
    assert set(results["baselines"]) == {"original", "aligned"}
    for run in results["runs"]:
        for key in ("harmful_score", "over_refusal", "task_loss", "accuracy", "val_task_loss", "wall_seconds"):
            assert run[key] == run[key], key  # not NaN
    guard = [r for r in results["runs"] if r["method"] == "guardspace"]
    assert guard and guard[0]["null_space"]["layers"] == 210 and guard[0]["calibration"] == "template"
    assert results["matched"] and "goal_check" in results
    assert "| lora |" in proc.stdout  # the table is printed

    # A rerun skips every finished run and only rebuilds the report.
    rerun = subprocess.run(
        [sys.executable, "-m", "benchmarks.safety.run", "--profile", "smoke", "--out", str(out), "--data-dir", str(shared_data)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert rerun.returncode == 0 and rerun.stdout.count("done already, skipped") == expected


def test_borderline_alignment_prompts_never_overlap_the_over_refusal_sets(smoke_splits):
    assert smoke_splits.align_borderline, "the smoke profile aligns on borderline prompts too"
    leaked = smoke_splits.xstest_eval[0].lower() + " "
    with pytest.raises(OverlapError, match="borderline"):
        replace(smoke_splits, align_borderline=smoke_splits.align_borderline + [leaked]).check()
    with pytest.raises(OverlapError, match="borderline"):
        replace(smoke_splits, align_borderline=smoke_splits.align_borderline + [smoke_splits.xstest_val[0]]).check()


def test_set_overrides_are_typed_and_typos_are_rejected():
    from benchmarks.safety.run import profile_overrides

    profile = PROFILES["cpu"]
    assert profile_overrides(profile, ["align_epochs=3", "align_lr=2e-4"]) == {"align_epochs": 3, "align_lr": 2e-4}
    with pytest.raises(SystemExit, match="align_epochs"):
        profile_overrides(profile, ["align_epoch=3"])
