"""The safety benchmark (benchmarks/safety/): its splits, its selection rule, its job planner and locks, and a smoke
run end to end on the real model with two worker processes.

The benchmark itself (``--profile cpu`` / ``full``) is not part of the test suite; ``--profile smoke`` runs every
stage (alignment, every kind of method, post-hoc repairs, full evaluation of the picks with two seeds, report) at
tiny sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.safety.profiles import PROFILES, Profile
from benchmarks.safety.splits import OverlapError, check_disjoint, make_splits
from guardspace_pl.datamodules import normalise_prompt

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


@pytest.mark.parametrize("profile", ["smoke", "cpu", "full"])
def test_profile_splits_are_disjoint_and_sized(shared_data, profile):
    size = PROFILES[profile]
    splits = make_splits(size, shared_data)  # make_splits runs splits.check()
    assert {k: len(v) for k, v in splits.eval_harmful.items()} == {
        "HarmBench": size.eval_sizes["harmbench"],
        "AdvBench": size.eval_sizes["advbench"],
    }
    assert (
        len(splits.eval_safe["xstest"]) == size.eval_sizes["xstest"]
        and len(splits.eval_safe["harmless"]) == size.eval_sizes["harmless"]
    )
    assert len(splits.calibration["advbench"]) == len(splits.calibration["mixed"]) == size.calibration_count
    assert len(splits.calibration["mixed_large"]) == size.calibration_count_large
    harmful_eval = {normalise_prompt(p) for group in splits.eval_harmful.values() for p in group}
    used = [p for group in splits.alignment.values() for p in group]
    used += [p for group in splits.calibration.values() for p in group]
    used += [r["prompt"] for r in splits.poison] + splits.spf_prompts + splits.lssf_anchors
    assert not harmful_eval & {normalise_prompt(p) for p in used}
    if profile == "cpu":
        assert len(harmful_eval) >= 150  # the issue's floor, from two sources
        # The mixed calibration really mixes: HarmBench and harmful_train prompts beside AdvBench's.
        assert set(splits.calibration["mixed"]) - set(splits.calibration["advbench"])


def test_alignment_prompts_are_the_shipped_patch_configs(shared_data):
    """The splits read the patch's training prompts from configs/safety_patch_smollm2.yaml itself."""
    import yaml

    from guardspace_pl.datamodules.safety import PromptSet

    config = yaml.safe_load((ROOT / "configs" / "safety_patch_smollm2.yaml").read_text())
    splits = make_splits(PROFILES["cpu"], shared_data)
    entry = dict(config["data"]["harmless"][0], source=str(shared_data / "refusal_direction" / "harmless_train.json"))
    assert splits.alignment["harmless"] == PromptSet(**entry).load()
    assert len(splits.alignment["harmful"]) == 260 and len(splits.alignment["borderline"]) == 100


@pytest.mark.parametrize("role", ["alignment", "calibration", "poison", "spf_prompts", "lssf_anchors", "val_harmful"])
def test_splits_check_rejects_an_evaluation_prompt_in_any_other_role(smoke_splits, role):
    leaked = smoke_splits.eval_harmful["AdvBench"][0].upper() + "  ."  # same prompt once normalised
    value = getattr(smoke_splits, role)
    if role == "poison":
        value = value + [{"prompt": leaked, "target": "Sure"}]
    elif isinstance(value, dict):
        first = next(iter(value))
        value = {**value, first: value[first] + [leaked]}
    else:
        value = value + [leaked]
    with pytest.raises(OverlapError):
        replace(smoke_splits, **{role: value}).check()


def test_borderline_alignment_prompts_never_overlap_the_over_refusal_sets(smoke_splits):
    for leaked in (smoke_splits.eval_safe["xstest"][0].lower() + " ", smoke_splits.val_safe["xstest"][0]):
        alignment = {**smoke_splits.alignment, "borderline": smoke_splits.alignment["borderline"] + [leaked]}
        with pytest.raises(OverlapError, match="borderline"):
            replace(smoke_splits, alignment=alignment).check()


def _row(variant, lr, loss, harmful, refusal=0.0, **extra):
    return {
        "variant": variant,
        "run_id": f"{variant}-{lr}",
        "lr": lr,
        "val_task_loss": loss,
        "val_harmful_score": harmful,
        "val_over_refusal": refusal,
        **extra,
    }


def test_matched_pick_is_the_safest_lr_within_three_percent_of_loras_best_loss():
    from benchmarks.safety.report import matched_picks

    rows = [
        _row("lora", 1e-4, 1.30, 20.0), _row("lora", 1e-3, 1.00, 80.0),
        _row("guardspace", 1e-5, 1.04, 5.0),   # 4 % above LoRA's best: not matched
        _row("guardspace", 1e-4, 1.02, 30.0),  # matched
        _row("guardspace", 3e-4, 1.01, 30.0, refusal=10.0),  # matched, same harm, more over-refusal
        _row("nullspace", 1e-3, 1.20, 0.0), _row("nullspace", 3e-3, 1.10, 10.0),  # none matched
    ]
    picks = matched_picks(rows)
    assert picks["lora"]["lr"] == 1e-3 and picks["lora"]["matched"]
    assert picks["guardspace"]["lr"] == 1e-4 and picks["guardspace"]["matched"]
    assert picks["nullspace"]["lr"] == 3e-3 and not picks["nullspace"]["matched"]  # the lowest loss, flagged
    with pytest.raises(ValueError, match="LoRA"):
        matched_picks([_row("guardspace", 1e-5, 1.0, 0.0)])


def test_profiles_reject_a_method_without_learning_rates_or_a_wrong_calibration():
    base = PROFILES["smoke"]
    with pytest.raises(ValueError, match="no learning rates for 'spf'"):
        replace(base, variants=base.variants + (("spf", "-"),))
    with pytest.raises(ValueError, match="calibration"):
        replace(base, variants=(("lora", "template"),))
    with pytest.raises(ValueError, match="unknown method"):
        replace(base, variants=(("lora", "-"), ("dora", "-")))


def _write(out: Path, kind: str, name: str, **fields) -> None:
    path = out / ("full" if kind == "full" else "runs") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))


def _finish(out: Path, spec, kind: str = "train", loss: float = 1.0, harmful: float = 50.0) -> None:
    """Write the result a finished job would have written (what the planner reads)."""
    _write(
        out,
        kind,
        spec.run_id,
        run_id=spec.run_id,
        variant=spec.variant,
        method=spec.method,
        lr=spec.lr,
        calibration=getattr(spec, "base", spec).calibration,
        posthoc=getattr(spec, "posthoc", "-"),
        weight=getattr(spec, "weight", None),
        refresh_every=getattr(spec, "refresh_every", None),
        val_task_loss=loss,
        val_harmful_score=harmful,
        val_over_refusal=0.0,
    )


def _tiny_profile() -> Profile:
    return replace(
        PROFILES["smoke"], variants=(("lora", "-"), ("asft", "-")), lrs={"lora": (1e-4, 1e-3), "asft": (1e-4, 1e-3)},
        coverage=(), posthoc=("patch",), asft_weights=(1.0, 10.0), seeds=(0, 1), grid_extensions=1, p_grid=(0.2,),
    )


def test_planner_orders_the_jobs_grows_an_edge_grid_and_waits_for_inputs(tmp_path):
    from benchmarks.safety.attack import PosthocSpec, RunSpec
    from benchmarks.safety.run import Planner

    planner = Planner(_tiny_profile(), tmp_path, [0.2])
    keys = lambda jobs: [j.key for j in jobs]  # noqa: E731
    ready, waiting = planner.pending()
    assert keys(ready)[:2] == ["full-original", "full-aligned"]
    assert "train-lora-none_lr1e-04_p0.2_s0" in keys(ready) and "train-asft-none_lr1e-03_p0.2_s0_l1" in keys(ready)
    assert waiting  # post-hoc runs wait for their LoRA run; AsFT's lambda 10 for its lr grid

    def done(spec, kind="train", loss=1.0, harmful=50.0):
        _finish(tmp_path, spec, kind, loss, harmful)

    for name in ("original", "aligned"):
        _write(tmp_path, "full", name)
    lora = [RunSpec("lora", "-", lr, 0.2, 0) for lr in (1e-4, 1e-3)]
    done(lora[0], loss=1.2)
    done(lora[1], loss=1.0)  # the best loss at the grid's top edge: the grid grows to 3e-3
    ready, _ = planner.pending()
    assert "train-lora-none_lr3e-03_p0.2_s0" in keys(ready)
    assert "posthoc-lora-none_lr1e-03_p0.2_s0+patch" in keys(ready)
    done(RunSpec("lora", "-", 3e-3, 0.2, 0), loss=1.1)  # worse: the grid stops growing
    asft = [RunSpec("asft", "-", lr, 0.2, 0, 1.0) for lr in (1e-4, 1e-3)]
    done(asft[0], loss=1.02, harmful=10.0)  # matched (within 3 %) and safer
    done(asft[1], loss=1.01, harmful=40.0)  # the lowest loss, at the top edge: AsFT's grid grows too
    assert "train-asft-none_lr3e-03_p0.2_s0_l1" in keys(planner.pending()[0])
    done(RunSpec("asft", "-", 3e-3, 0.2, 0, 1.0), loss=1.05, harmful=60.0)
    for spec in lora + [RunSpec("lora", "-", 3e-3, 0.2, 0)]:
        done(PosthocSpec(spec, "patch"), kind="posthoc", loss=1.0)
    ready, waiting = planner.pending()
    assert "train-asft-none_lr1e-04_p0.2_s0_l10" in keys(ready)  # lambda 10 at AsFT's pick, not at its lowest loss
    # Phase 2 of a variant starts once its grid (and LoRA's) is done: each pick evaluated in full at seed 0, trained
    # again (and evaluated) at seed 1; it comes before the phase-1 jobs still left.
    phase2 = {"full-lora-none_lr1e-03_p0.2_s0", "train-lora-none_lr1e-03_p0.2_s1", "full-asft-none_lr1e-04_p0.2_s0_l1",
              "full-lora-none_lr1e-04_p0.2_s0+patch"}
    assert phase2 <= set(keys(ready))
    assert keys(ready).index("train-asft-none_lr1e-04_p0.2_s0_l10") > max(keys(ready).index(k) for k in phase2)
    assert not any("_l10" in k and k.startswith("full") for k in keys(ready))  # its own run is not done yet
    assert "full-lora-none_lr1e-03_p0.2_s1" not in keys(ready) and waiting  # needs its seed-1 training first
    done(RunSpec("asft", "-", 1e-4, 0.2, 0, 10.0), loss=1.0, harmful=0.0)
    assert "full-asft-none_lr1e-04_p0.2_s0_l10" in keys(planner.pending()[0])


def test_spf_slower_refresh_runs_at_spfs_matched_lr_and_is_its_own_variant(tmp_path):
    from benchmarks.safety.attack import RunSpec
    from benchmarks.safety.run import Planner

    profile = replace(
        PROFILES["smoke"], variants=(("lora", "-"), ("spf", "-")), lrs={"lora": (1e-4, 1e-3), "spf": (1e-4, 1e-3)},
        coverage=(), posthoc=(), spf_refresh=(10,), seeds=(0, 1), grid_extensions=0, p_grid=(0.2,), coverage_p=0.2,
    )
    planner = Planner(profile, tmp_path, [0.2])
    keys = lambda jobs: [j.key for j in jobs]  # noqa: E731
    for name in ("original", "aligned"):
        _write(tmp_path, "full", name)
    assert not any("_r10" in k for k in keys(planner.pending()[0]))  # waits for SPF's grid
    _finish(tmp_path, RunSpec("lora", "-", 1e-4, 0.2, 0), loss=1.0)
    _finish(tmp_path, RunSpec("lora", "-", 1e-3, 0.2, 0), loss=1.2)
    _finish(tmp_path, RunSpec("spf", "-", 1e-4, 0.2, 0), loss=1.5, harmful=5.0)  # not matched
    _finish(tmp_path, RunSpec("spf", "-", 1e-3, 0.2, 0), loss=1.01, harmful=30.0)  # matched
    slow = RunSpec("spf", "-", 1e-3, 0.2, 0, refresh_every=10)
    assert slow.variant == "spf(r=10)" and slow.run_id == "spf-none_lr1e-03_p0.2_s0_r10"
    assert f"train-{slow.run_id}" in keys(planner.pending()[0])
    _finish(tmp_path, slow, loss=1.02, harmful=32.0)
    # Its own matched pick: evaluated in full and trained again at seed 1 with the same refresh.
    ready = keys(planner.pending()[0])
    assert f"full-{slow.run_id}" in ready and "train-spf-none_lr1e-03_p0.2_s1_r10" in ready
    # A cost study: at the coverage p only (another p runs SPF's grid and its pick alone).
    assert planner.at_matched_lr("spf", 0.0) == [] and planner.at_matched_lr("spf", 0.2) == [{"refresh_every": 10}]
    with pytest.raises(ValueError, match="spf_refresh"):
        replace(profile, spf_refresh=(0,))


def test_a_grid_with_no_matched_point_gains_the_midpoints_around_its_best(tmp_path):
    from benchmarks.safety.attack import RunSpec
    from benchmarks.safety.run import Planner

    profile = replace(
        PROFILES["smoke"], variants=(("lora", "-"), ("nullspace", "template")),
        lrs={"lora": (1e-4, 1e-3), "nullspace": (3e-5, 1e-4, 3e-4)}, coverage=(), posthoc=(), seeds=(0,),
        grid_extensions=0, grid_refinements=1, p_grid=(0.2,),
    )
    planner = Planner(profile, tmp_path, [0.2])
    keys = lambda jobs: [j.key for j in jobs]  # noqa: E731
    for name in ("original", "aligned"):
        _write(tmp_path, "full", name)
    _finish(tmp_path, RunSpec("lora", "-", 1e-4, 0.2, 0), loss=1.5)
    _finish(tmp_path, RunSpec("lora", "-", 1e-3, 0.2, 0), loss=1.0)
    null = lambda lr: RunSpec("nullspace", "template", lr, 0.2, 0)  # noqa: E731
    _finish(tmp_path, null(3e-5), loss=1.30)
    _finish(tmp_path, null(1e-4), loss=1.08)  # the best, 8 % above LoRA's 1.0: not matched
    _finish(tmp_path, null(3e-4), loss=1.12)
    ready = keys(planner.pending()[0])
    assert f"train-{null(5e-5).run_id}" in ready and f"train-{null(2e-4).run_id}" in ready
    assert not any(k.startswith("full-nullspace") for k in ready)  # the variant is unfinished until they are done
    _finish(tmp_path, null(5e-5), loss=1.2)
    _finish(tmp_path, null(2e-4), loss=1.02, harmful=20.0)  # matched
    ready = keys(planner.pending()[0])
    assert f"full-{null(2e-4).run_id}" in ready  # the new pick
    assert [s.lr for s in planner.grid("nullspace", "template", 0.2)] == [3e-5, 5e-5, 1e-4, 2e-4, 3e-4]
    # A grid with a matched point is left as it is.
    _finish(tmp_path, null(1e-4), loss=1.02)
    assert [s.lr for s in planner.grid("nullspace", "template", 0.2)] == [3e-5, 1e-4, 3e-4]


def _fake_result(job) -> dict:
    """A finished job's record with every field the report reads, its numbers a function of the run's settings."""
    from benchmarks.safety.attack import describe

    spec = job.spec
    if job.kind == "full" and not hasattr(spec, "lr"):  # a baseline
        row = {"run_id": spec.run_id}
        lr, seed, shift = 1e-3, 0, 0.0
    else:
        row = describe(spec)
        lr, seed = spec.lr, spec.seed
        shift = {"-": 0.0, "patch": -20.0}[row["posthoc"]] + (10.0 if row["method"] == "asft" else 0.0)
    harmful = max(0.0, min(100.0, 40.0 + 10_000 * lr + shift + 2 * seed))
    rate = lambda percent: {"percent": percent, "count": 0, "n": 20, "ci95": [percent / 2, (100 + percent) / 2]}  # noqa: E731
    row |= {"val_task_loss": 1.0 + abs(lr - 1e-3) * 100, "val_harmful_score": harmful, "val_over_refusal": 10.0,
            "val_refusal": {"xstest": rate(10.0), "harmless": rate(2.0)}, "train_seconds": 1.0, "steps": 2}
    if job.kind == "full":
        row |= {"harmful": {"HarmBench": rate(harmful), "AdvBench": rate(harmful / 2), "pooled": rate(harmful)},
                "refusal": {"xstest": rate(12.0 + seed), "harmless": rate(3.0)}, "harmful_score": harmful,
                "over_refusal": 12.0 + seed, "harmless_refusal": 3.0, "task_loss": 1.1 + seed / 100, "accuracy": 5.0,
                "samples": {"xstest": [{"prompt": "quoted", "response": "never committed"}]}}
    row["wall_seconds"] = 1.0
    return row


def test_a_fresh_clone_resumes_from_the_committed_results_json(tmp_path):
    """Job files and models are never committed: a clone holding only results.json runs no finished job again and
    rebuilds the same report; a summary made with other seeds is not reused."""
    import shutil

    from benchmarks.safety.report import build_report
    from benchmarks.safety.run import Planner, jobs_loop, restore_from_results, result_file
    from guardspace_pl.io import write_json

    profile = _tiny_profile()
    header = {"profile": profile.to_dict()}

    def run(job):
        row = _fake_result(job)
        write_json(result_file(tmp_path, job.kind, job.spec.run_id), row)
        return row

    planner = Planner(profile, tmp_path, [0.2])
    ran = [r["run_id"] for r in jobs_loop(planner, tmp_path, run, log=lambda _: None)]
    assert len(ran) > 20 and not planner.pending()[0]
    first = build_report(tmp_path, header, planner)
    assert {"lora", "lora+patch", "asft", "asft(l=10)"} <= set(first["per_p"]["0.2"]["summaries"])
    assert "quoted" not in (tmp_path / "results.json").read_text()  # what is committed quotes no prompt

    for folder in ("runs", "full", "states"):  # what a fresh clone lacks
        shutil.rmtree(tmp_path / folder, ignore_errors=True)
    before = Planner(profile, tmp_path, [0.2])
    assert "train-lora-none_lr1e-04_p0.2_s0" in [j.key for j in before.pending()[0]]  # without it: all again
    planner = Planner(profile, tmp_path, [0.2], restore_from_results(tmp_path))
    assert planner.pending() == ([], False)
    again = build_report(tmp_path, header, planner)
    assert again["per_p"] == first["per_p"] and again["baselines"] == first["baselines"]

    # Seeds changed since the commit: the picks' summaries do not describe the new seed set, so they run again.
    three = replace(profile, seeds=(0, 1, 2))
    planner = Planner(three, tmp_path, [0.2], restore_from_results(tmp_path))
    keys = [job.key for job in planner.pending()[0]]
    assert {"train-lora-none_lr1e-03_p0.2_s2", "full-lora-none_lr1e-03_p0.2_s0"} <= set(keys)
    assert not any(k.startswith("train-") and k.endswith("_s0") for k in keys)  # the grids are not run again
    assert "lora" in build_report(tmp_path, {"profile": three.to_dict()}, planner)["per_p"]["0.2"]["missing_full"]


def test_a_job_lock_is_exclusive_and_a_dead_workers_lock_is_taken_over(tmp_path):
    import socket

    from benchmarks.safety.run import Job, _Baseline, claim

    job = Job("full", _Baseline("original"))
    lock = claim(tmp_path, job)
    assert lock is not None and claim(tmp_path, job) is None  # held by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    assert claim(tmp_path, job) is not None  # its owner exited: taken over
    lock.write_text(f"another-host {os.getpid()}")
    assert claim(tmp_path, job) is None  # another machine's lock is never broken


def test_supervisor_restarts_recycled_and_killed_workers_and_stops_on_repeated_crashes(tmp_path):
    from benchmarks.safety.run import MAX_CRASHES, RECYCLE_EXIT, supervise

    # Worker 0 recycles twice, is then killed by a signal (as the OOM killer does), then finishes; worker 1 finishes.
    plan = {0: [f"raise SystemExit({RECYCLE_EXIT})"] * 2 + ["import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                                                           "pass"],
            1: ["pass"]}
    started = []

    def start(index):
        started.append(index)
        return subprocess.Popen([sys.executable, "-c", plan[index].pop(0)])

    supervise(start, 2, poll_seconds=0.05)
    assert sorted(started) == [0, 0, 0, 0, 1] and plan == {0: [], 1: []}

    with pytest.raises(SystemExit, match=f"failed {MAX_CRASHES} times in a row"):
        supervise(lambda index: subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"]), 1, poll_seconds=0.05)


def test_jobs_per_process_below_one_is_rejected(capsys):
    from benchmarks.safety.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--jobs-per-process", "0"])
    assert "--jobs-per-process must be at least 1" in capsys.readouterr().err


def test_set_overrides_are_typed_and_typos_are_rejected():
    from benchmarks.safety.run import profile_overrides, without_workers

    profile = PROFILES["cpu"]
    assert profile_overrides(profile, ["n=64", "judge_tokens=32"]) == {"n": 64, "judge_tokens": 32}
    with pytest.raises(SystemExit, match="judge_tokens"):
        profile_overrides(profile, ["judge_token=3"])
    stripped = without_workers(["--profile", "cpu", "--workers", "2", "--threads", "1"])
    assert stripped == ["--profile", "cpu", "--threads", "1"]


@pytest.mark.slow
def test_smoke_profile_runs_every_method_end_to_end_with_two_workers(tmp_path, shared_data):
    out = tmp_path / "safety_smoke"
    command = [
        sys.executable, "-m", "benchmarks.safety.run",
        "--profile", "smoke", "--out", str(out), "--data-dir", str(shared_data),
    ]
    proc = subprocess.run(
        [*command, "--workers", "2", "--jobs-per-process", "8"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "handing over to a fresh process" in proc.stdout  # workers were recycled, and the run still completed
    for name in ("results.json", "table.md", "frontier.png", "harmful_vs_p.png", "splits.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert " w0 " in proc.stdout and " w1 " in proc.stdout  # both workers ran jobs
    results = json.loads((out / "results.json").read_text())
    block = results["per_p"]["0.25"]
    expected = {"lora", "lora+safelora", "lora+lssf", "lora+patch", "guardspace/template", "asft", "asft(l=10)",
                "nullspace+spf/template", "nullspace/mixed"}
    assert set(block["summaries"]) == expected and not block["missing_full"]
    for summary in block["summaries"].values():
        assert summary["seeds"] == [0, 1]
        low, high = summary["harmful_score_ci95"]
        assert 0 <= low <= summary["harmful_score"] <= high <= 100
        assert summary["harmful_score_n"] == 4  # two sources pooled
    guard = next(r for r in block["validation"] if r["variant"] == "guardspace/template")
    assert guard["null_space"]["layers"] == 210
    assert set(results["baselines"]) == {"original", "aligned"}
    assert not list((out / "states").glob("*/model"))  # every merged model was read once and removed
    assert "| lora |" in proc.stdout  # the table is printed

    # A rerun finds every job done: it runs none and rebuilds the same report.
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "train-" not in rerun.stdout and "full-" not in rerun.stdout
    assert json.loads((out / "results.json").read_text())["per_p"] == results["per_p"]

    # A fresh clone holds results.json only (the aligned start is kept here, for speed). With one pick's summary taken
    # out, that pick alone runs again: its seed-1 LoRA run is trained again, its seed-0 one (whose validation row is
    # restored) inside the evaluation that needs it, and the numbers come out the same.
    import shutil

    for folder in ("runs", "full", "states"):
        shutil.rmtree(out / folder)
    committed = json.loads((out / "results.json").read_text())
    dropped = committed["per_p"]["0.25"]["summaries"].pop("lora+patch")
    (out / "results.json").write_text(json.dumps(committed))
    clone = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert clone.returncode == 0, clone.stdout[-3000:] + clone.stderr[-3000:]
    keys = [line.split("] ")[1] for line in clone.stdout.splitlines() if line.startswith("[") and "] " in line]
    seed0, seed1 = dropped["run_ids"]
    assert {k for k in keys if k.startswith(("train-", "full-", "posthoc-"))} == {
        f"train-{seed1.split('+')[0]}", f"posthoc-{seed1}", f"full-{seed0}", f"full-{seed1}"
    }
    rebuilt = json.loads((out / "full" / f"{seed0}.json").read_text())["state_rebuilt"]
    assert rebuilt["final_train_loss"] == pytest.approx(rebuilt["recorded_final_train_loss"], rel=1e-5)
    again = json.loads((out / "results.json").read_text())["per_p"]["0.25"]["summaries"]
    assert again.keys() == results["per_p"]["0.25"]["summaries"].keys()
    for metric in ("harmful_score", "over_refusal", "harmless_refusal", "task_loss"):
        assert again["lora+patch"][metric] == pytest.approx(dropped[metric], rel=1e-4), metric
