"""Every safety method side by side under a fine-tuning attack: one command, every stage, the table at the end.

    python -m benchmarks.safety.run --profile cpu --workers 2   # hours on 2 CPU cores; resumable, run it in parts
    python -m benchmarks.safety.run --profile full              # the paper-scale attack, for a GPU
    python -m benchmarks.safety.run --profile smoke             # tiny sizes (tests/test_safety_benchmark.py)

Stages: (1) the aligned start: SmolLM2-135M-Instruct with the safety patch of ``configs/safety_patch_smollm2.yaml``
made by the ``align`` workflow, merged (cached; ``--patch`` reuses a patch that config trained); (2) per poison
fraction p, every training method over its learning-rate grid (seed 0), each run measured on VALIDATION prompts;
SafeLoRA, LSSF and re-applying the patch on every plain LoRA run; AsFT's other lambdas at its chosen lr; the
null-space calibration study; (3) per method and p, the matched-utility pick (validation only, see report.py)
trained again with every other seed, and every pick's model evaluated on the held-out sets; (4) ``results.json``,
``table.md`` and the plots under ``--out``.

Each job writes its JSON as it finishes and a rerun skips it, so the benchmark can span sessions. ``--workers N``
runs N worker processes that claim jobs with lock files (one torch thread each); a job whose inputs are not
finished waits for the worker that is making them.

The per-job files quote evaluation prompts and are never committed; the committed ``results.json`` is the durable
record. A fresh clone resumes from it (``restore_from_results``): its seed-0 validation rows and baselines are
written back as job files, and every run of a pick it summarises counts as done. Models are not committed either: a
job that needs a run's model that is not on disk trains it again first (same seed, same data: the same model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from benchmarks._common import RESULTS_DIR, environment, release_memory, repo_relative
from benchmarks.safety.profiles import PROFILES, Profile
from benchmarks.safety.splits import DEFAULT_DATA_DIR, make_splits
from guardspace_pl.io import write_json

MODEL = "builtin:smollm2-135m-instruct"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/safety_methods_<profile>)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--patch", type=Path, help="a safety patch already trained by the profile's align config (skips training it)"
    )
    parser.add_argument(
        "--threshold", type=float, default=1e-3, help="NullSpaceProjection relative eigenvalue threshold"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per worker; 1 avoids oversubscription"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the jobs (lock files)")
    parser.add_argument("--p", type=float, nargs="*", help="restrict to these poison fractions")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the table, JSON and plots from finished jobs"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override profile sizes, e.g. n=64")
    parser.add_argument(
        "--jobs-per-process", type=int, default=6,
        help="with --workers: a worker process hands over to a fresh one after this many jobs (bounds its memory)",
    )
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs_per_process < 1:
        # 0 would make every worker hand over before its first job, and the supervisor restart it forever.
        parser.error(f"--jobs-per-process must be at least 1, got {args.jobs_per_process}.")
    return args


def profile_overrides(profile: Profile, assignments: list[str]) -> dict:
    """``["n=64", "judge_tokens=32"]`` -> typed overrides of ``profile``'s scalar fields."""
    fields = profile.to_dict()
    out = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or isinstance(fields[name], (dict, tuple, list)):
            scalars = sorted(k for k, v in fields.items() if not isinstance(v, (dict, tuple, list)))
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {scalars}.")
        out[name] = type(fields[name])(value)
    return out


# --------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    kind: str   # "train", "posthoc" or "full"
    spec: Any   # RunSpec or PosthocSpec

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.spec.run_id}"


def result_file(out: Path, kind: str, run_id: str) -> Path:
    return out / ("full" if kind == "full" else "runs") / f"{run_id}.json"


def read_result(out: Path, kind: str, run_id: str) -> Optional[dict[str, Any]]:
    path = result_file(out, kind, run_id)
    return json.loads(path.read_text()) if path.exists() else None


def restore_from_results(out: Path) -> dict[str, dict[str, Any]]:
    """Resume a fresh clone from the committed ``out/results.json``: write its seed-0 validation rows (``runs/``) and
    baselines (``full/``) back where their files are missing, and return ``run_id -> held-out summary`` for every run
    of every pick it summarises (that pick's later seeds and full evaluations are done: the summary is their
    result)."""
    path = out / "results.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    for name, row in report.get("baselines", {}).items():
        if read_result(out, "full", name) is None:
            write_json(result_file(out, "full", name), row)
    carried: dict[str, dict[str, Any]] = {}
    for block in report.get("per_p", {}).values():
        for row in block["validation"]:
            if read_result(out, "train", row["run_id"]) is None:
                write_json(result_file(out, "train", row["run_id"]), row)
        for summary in block["summaries"].values():
            carried |= dict.fromkeys(summary["run_ids"], summary)
    return carried


class Planner:
    """What is left to do, in order, from the result files alone (so that every worker agrees), and from the
    summaries ``carried`` over from a committed ``results.json`` (``restore_from_results``)."""

    def __init__(
        self, profile: Profile, out: Path, ps: list[float], carried: Optional[dict[str, dict[str, Any]]] = None
    ) -> None:
        self.profile, self.out, self.ps = profile, out, ps
        self.seed = profile.seeds[0]
        self.carried = carried or {}

    def done(self, kind: str, spec: Any) -> Optional[dict[str, Any]]:
        return read_result(self.out, kind, spec.run_id)

    def carried_summary(self, run_ids: list[str]) -> Optional[dict[str, Any]]:
        """The committed summary of the pick made of exactly these runs, if there is one."""
        summary = self.carried.get(run_ids[0])
        return summary if summary is not None and summary["run_ids"] == run_ids else None

    def grid(self, method: str, calibration: str, p: float, weight: Optional[float] = None) -> list[Any]:
        """The method's lr grid at seed 0, grown upward while its best validation loss sits on the top edge."""
        from benchmarks.safety.attack import RunSpec

        lrs = list(self.profile.lrs[method])
        for _ in range(self.profile.grid_extensions):
            rows = [self.done("train", RunSpec(method, calibration, lr, p, self.seed, weight)) for lr in lrs]
            if any(r is None for r in rows) or len(lrs) < 2:
                break
            best = min(rows, key=lambda r: r["val_task_loss"])
            if best["lr"] != max(lrs):
                break
            lrs.append(float(f"{max(lrs) * 3:.0e}"))
        if method != "lora" and self.profile.grid_refinements:
            lrs = self.refined(method, calibration, p, weight, lrs)
        return [RunSpec(method, calibration, lr, p, self.seed, weight) for lr in lrs]

    def refined(
        self, method: str, calibration: str, p: float, weight: Optional[float], lrs: list[float]
    ) -> list[float]:
        """``lrs`` plus, when no point of it is within the utility tolerance of plain LoRA's best validation loss, the
        geometric midpoints between its best point and that point's neighbours, to one significant digit as every lr
        here: a grid can straddle the matched region without a point in it. The midpoints are computed from ``lrs``
        alone, so they are added once and never refined again."""
        from benchmarks.safety.attack import RunSpec
        from benchmarks.safety.report import UTILITY_TOLERANCE

        lrs = sorted(lrs)
        rows = [self.done("train", RunSpec(method, calibration, lr, p, self.seed, weight)) for lr in lrs]
        lora = [self.done("train", spec) for spec in self.grid("lora", "-", p)]
        if any(r is None for r in rows + lora) or len(lrs) < 2:
            return lrs
        target = (1 + UTILITY_TOLERANCE) * min(r["val_task_loss"] for r in lora)
        if any(r["val_task_loss"] <= target for r in rows):
            return lrs
        best = min(range(len(lrs)), key=lambda i: rows[i]["val_task_loss"])
        neighbours = [lrs[i] for i in (best - 1, best + 1) if 0 <= i < len(lrs)]
        midpoints = [float(f"{(lrs[best] * other) ** 0.5:.0e}") for other in neighbours]
        return sorted(set(lrs) | set(midpoints))

    def phase1(self, p: float) -> tuple[list[Job], bool]:
        """Seed-0 jobs of ``p`` (and whether some cannot be planned yet)."""
        from benchmarks.safety.attack import PosthocSpec, RunSpec

        jobs: list[Job] = []
        blocked = False
        variants = list(self.profile.variants)
        if p == self.profile.coverage_p:
            variants += [("nullspace", c) for c in self.profile.coverage]
        for method, calibration in variants:
            specs = self.grid(method, calibration, p, 1.0 if method == "asft" else None)
            jobs += [Job("train", s) for s in specs]
            if method == "lora":
                jobs += [Job("posthoc", PosthocSpec(s, name)) for s in specs for name in self.profile.posthoc]
            settings = self.at_matched_lr(method, p)
            if settings:
                rows = [self.done("train", s) for s in specs]
                if any(r is None for r in rows):
                    blocked = True
                    continue
                lora = [self.done("train", s) for s in self.grid("lora", "-", p)]
                if any(r is None for r in lora):
                    blocked = True
                    continue
                from benchmarks.safety.report import pick

                best = pick(rows, min(r["val_task_loss"] for r in lora))
                jobs += [
                    Job("train", RunSpec(method, calibration, best["lr"], p, self.seed, **setting))
                    for setting in settings
                ]
        return jobs, blocked

    def at_matched_lr(self, method: str, p: float) -> list[dict[str, Any]]:
        """Settings run only at the method's matched lr (its grid runs at the default): AsFT's other lambdas; SPF's
        slower refreshes, a cost study, at the coverage p only."""
        if method == "asft":
            return [{"weight": w} for w in self.profile.asft_weights if w != 1.0]
        if method == "spf" and p == self.profile.coverage_p:
            return [{"refresh_every": r} for r in self.profile.spf_refresh if r != 1]
        return []

    def finished_variants(self, phase1: list[Job]) -> list[Job]:
        """The phase-1 jobs of every variant whose runs have all finished, once plain LoRA's have (the reference)."""
        unfinished = {job.spec.variant for job in phase1 if self.done(job.kind, job.spec) is None}
        if "lora" in unfinished:
            return []
        return [job for job in phase1 if job.spec.variant not in unfinished]

    def phase2(self, p: float, finished: list[Job]) -> list[Job]:
        """Full evaluation of the matched pick of every finished variant, and its other seeds."""
        from benchmarks.safety.attack import PosthocSpec
        from benchmarks.safety.report import matched_picks

        if not finished:
            return []
        rows = [self.done(job.kind, job.spec) for job in finished]
        jobs: list[Job] = []
        for row in matched_picks(rows).values():
            if self.carried_summary([spec.run_id for spec in self.pick_specs(row, p)]) is not None:
                continue
            for spec in self.pick_specs(row, p):
                if spec.seed != self.seed:  # trained again with this seed (a post-hoc pick: its LoRA run, then it)
                    jobs += (
                        [Job("train", spec.base), Job("posthoc", spec)]
                        if isinstance(spec, PosthocSpec)
                        else [Job("train", spec)]
                    )
                jobs.append(Job("full", spec))
        return jobs

    def pick_specs(self, row: dict[str, Any], p: float) -> list[Any]:
        """A matched pick's run at every seed of the profile (the first is the seed-0 run it was chosen from)."""
        from benchmarks.safety.attack import PosthocSpec, RunSpec

        runs = [
            RunSpec(row["method"], row["calibration"], row["lr"], p, seed, row.get("weight"), row.get("refresh_every"))
            for seed in self.profile.seeds
        ]
        return runs if row["posthoc"] == "-" else [PosthocSpec(run, row["posthoc"]) for run in runs]

    def baseline_jobs(self) -> list[Job]:
        return [Job("full", _Baseline(name)) for name in ("original", "aligned")]

    def pending(self) -> tuple[list[Job], bool]:
        """(jobs not done whose inputs are, in order; whether other jobs wait on unfinished inputs)."""
        ready: list[Job] = []
        waiting = False
        for job in self.baseline_jobs():
            if self.done(job.kind, job.spec) is None:
                ready.append(job)
        for p in self.ps:
            # A variant's picks are evaluated as soon as its own grid (and LoRA's) is done: held-out numbers for the
            # first methods come before the last grids, and they come first in the order.
            jobs, blocked = self.phase1(p)
            finished = self.finished_variants(jobs)
            phase2 = self.phase2(p, finished)
            self.prune_states(finished, phase2)
            todo = [j for j in phase2 + jobs if self.done(j.kind, j.spec) is None]
            ready += [j for j in todo if self.inputs_done(j)]
            waiting |= blocked or any(not self.inputs_done(j) for j in todo)
        return ready, waiting

    def prune_states(self, phase1: list[Job], phase2: list[Job]) -> None:
        """Delete the merged models (~0.5 GB each at 135M) no full evaluation will read; LoRA adapters are kept."""
        needed = {job.spec.run_id for job in phase2 if job.kind == "full" and self.done("full", job.spec) is None}
        for job in phase1:
            if job.kind == "train" and job.spec.run_id not in needed:
                shutil.rmtree(self.out / "states" / job.spec.run_id / "model", ignore_errors=True)

    def inputs_done(self, job: Job) -> bool:
        from benchmarks.safety.attack import PosthocSpec

        spec = job.spec
        if job.kind == "posthoc":
            return self.done("train", spec.base) is not None
        if job.kind == "full" and not isinstance(spec, _Baseline):
            kind = "posthoc" if isinstance(spec, PosthocSpec) else "train"
            return self.done(kind, spec) is not None
        return True


@dataclass(frozen=True)
class _Baseline:
    """The original or the aligned model, evaluated once (``full/original.json``)."""

    name: str

    @property
    def run_id(self) -> str:
        return self.name


# --------------------------------------------------------------------------- locks
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(out: Path, job: Job) -> Optional[Path]:
    """Create ``locks/<job>.lock`` (atomic); a lock left by a dead process on this machine is taken over."""
    lock = out / "locks" / f"{job.key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                return None
            if host == socket.gethostname() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)
                continue
            return None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} {os.getpid()}")
        return lock
    return None


# --------------------------------------------------------------------------- running
def ensure_state(spec, ctx) -> Optional[dict[str, Any]]:
    """Train ``spec`` again when its model is not under ``states/`` (a fresh clone, a pruned model); returns what that
    training did, with the final training loss its recorded run had (the same seed and data give the same model)."""
    from benchmarks.safety.attack import train_run

    state = ctx.state_dir(spec.run_id)
    if (state / "model").exists() or (state / "adapter").exists():
        return None
    _, info = train_run(spec, ctx)
    recorded = read_result(ctx.out, "train", spec.run_id) or {}
    return {**info, "recorded_final_train_loss": recorded.get("final_train_loss")}


def run_job(job: Job, ctx, original_dir: str) -> dict[str, Any]:
    from benchmarks.safety.attack import PosthocSpec, describe, load_trained, posthoc_model, train_run
    from benchmarks.safety.evaluation import evaluate_full, validate
    from guardspace_pl.loading import load_causal_lm

    start = time.perf_counter()
    rebuilt: Optional[dict[str, Any]] = None
    if isinstance(job.spec, _Baseline):
        model = load_causal_lm(original_dir if job.spec.name == "original" else str(ctx.aligned_dir))
        result = {"run_id": job.spec.name, **evaluate_full(model, ctx.tokenizer, ctx.splits, ctx.profile, ctx.device),
                  **validate(model, ctx.tokenizer, ctx.splits, ctx.profile, ctx.device)}
    elif job.kind == "train":
        model, info = train_run(job.spec, ctx)
        result = {**describe(job.spec), **info, **validate(model, ctx.tokenizer, ctx.splits, ctx.profile, ctx.device)}
    elif job.kind == "posthoc":
        rebuilt = ensure_state(job.spec.base, ctx)
        model, info = posthoc_model(job.spec, ctx)
        base = read_result(ctx.out, "train", job.spec.base.run_id)
        result = {**describe(job.spec), "train_seconds": base["train_seconds"], "steps": base["steps"], **info,
                  **validate(model, ctx.tokenizer, ctx.splits, ctx.profile, ctx.device)}
    else:  # full evaluation of a pick: the kept model (post-hoc applied again, it is cheap)
        kind = "posthoc" if isinstance(job.spec, PosthocSpec) else "train"
        rebuilt = ensure_state(job.spec.base if kind == "posthoc" else job.spec, ctx)
        model = posthoc_model(job.spec, ctx)[0] if kind == "posthoc" else load_trained(job.spec, ctx)
        # The same model's validation metrics were measured by its run: read, not generated again.
        measured = read_result(ctx.out, kind, job.spec.run_id)
        validation = {k: v for k, v in measured.items() if k.startswith("val_")}
        result = {
            **describe(job.spec),
            **evaluate_full(model, ctx.tokenizer, ctx.splits, ctx.profile, ctx.device),
            **validation,
        }
    if rebuilt is not None:
        result["state_rebuilt"] = {k: rebuilt[k] for k in ("final_train_loss", "recorded_final_train_loss")}
    result["wall_seconds"] = time.perf_counter() - start
    write_json(result_file(ctx.out, job.kind, job.spec.run_id), result)
    if job.kind == "full":  # the merged model's last use (a plain LoRA adapter stays: post-hoc picks read it)
        shutil.rmtree(ctx.state_dir(job.spec.run_id) / "model", ignore_errors=True)
    return result


def summary_line(result: dict[str, Any]) -> str:
    if "harmful_score" in result:
        return (f"harmful {result['harmful_score']:.1f}%  XSTest {result['over_refusal']:.1f}%  harmless "
                f"{result['harmless_refusal']:.1f}%  loss {result['task_loss']:.3f}  acc {result['accuracy']:.0f}%")
    return (f"val harmful {result['val_harmful_score']:.1f}%  val XSTest {result['val_over_refusal']:.1f}%  "
            f"val loss {result['val_task_loss']:.3f}  {result['wall_seconds']:.0f}s")


def jobs_loop(
    planner: Planner,
    out: Path,
    run: Callable[[Job], dict[str, Any]],
    log: Callable[[str], None],
    max_jobs: Optional[int] = None,
) -> Iterator[dict]:
    """Claim and run ready jobs until none is left (or ``max_jobs`` have run); wait while other workers make missing
    inputs."""
    count = 0
    while max_jobs is None or count < max_jobs:
        ready, waiting = planner.pending()
        for job in ready:
            lock = claim(out, job)
            if lock is None:
                continue
            try:
                if planner.done(job.kind, job.spec) is not None:  # finished by another worker since the plan
                    continue
                log(f"{job.key}")
                result = run(job)
                log(f"    {summary_line(result)}")
                count += 1
                yield result
            finally:
                lock.unlink(missing_ok=True)
                release_memory(torch.device("cpu"))  # trims the C heap; the CUDA cache stays for the next job
            break  # plan again: a finished job may unlock others that come first
        else:
            if not ready and not waiting:
                return
            time.sleep(15)  # others hold every ready job, or inputs are being made


#: A worker's exit code after ``--jobs-per-process`` jobs: the supervisor starts a fresh process in its place.
RECYCLE_EXIT = 75
#: A worker killed (e.g. by the kernel's OOM killer) or crashing this many times in a row stops the run.
MAX_CRASHES = 3


def supervise(start: Callable[[int], subprocess.Popen], workers: int, poll_seconds: float = 5.0) -> None:
    """Run ``workers`` processes made by ``start(index)`` until each exits 0. A process that exits with
    ``RECYCLE_EXIT`` (it ran its share of jobs: a fresh process returns the memory a long-lived one accumulates) or
    dies (a signal, a crash) is started again; its job's lock is taken over as a dead process's. ``MAX_CRASHES``
    crashes in a row of one worker end the run."""
    procs = {}
    for index in range(workers):
        procs[index] = start(index)
        time.sleep(5 if index == 0 and workers > 1 else 0)  # the first makes the shared stages first
    crashes = dict.fromkeys(procs, 0)
    while procs:
        time.sleep(poll_seconds)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if code == 0:
                del procs[index]
                continue
            if code == RECYCLE_EXIT:
                crashes[index] = 0
            else:
                crashes[index] += 1
                print(f"worker {index} exited with {code} ({crashes[index]} in a row); starting it again", flush=True)
                if crashes[index] >= MAX_CRASHES:
                    for other in procs.values():
                        other.terminate()
                    raise SystemExit(f"Worker {index} failed {MAX_CRASHES} times in a row (last exit code {code}).")
            procs[index] = start(index)


def spawn_workers(args: argparse.Namespace, argv: list[str]) -> None:
    """``--workers N``: N copies of this command, each with ``--worker-index``, kept running by ``supervise``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def start(index: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "benchmarks.safety.run", *argv, "--worker-index", str(index), "--workers", "1"]
        return subprocess.Popen(command, env=env)

    supervise(start, args.workers)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    profile = profile.with_overrides(**profile_overrides(profile, args.set))
    out = args.out or RESULTS_DIR / f"safety_methods_{profile.name}"
    out.mkdir(parents=True, exist_ok=True)
    ps = [p for p in profile.p_grid if args.p is None or p in args.p]
    carried = restore_from_results(out)  # before any worker starts: they find the restored files in place
    if args.workers > 1 and not args.report_only:
        spawn_workers(args, without_workers(argv))
        args.report_only = True
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    header: dict[str, Any] = {
        "command": "python -m benchmarks.safety.run " + " ".join(argv),
        "profile": profile.to_dict(),
        "threshold": args.threshold,
        "model": MODEL,
        "environment": environment(device),
    }
    splits = make_splits(profile, args.data_dir)  # asserts every disjointness
    header["splits"] = splits.sizes()
    write_json(out / "splits.json", splits.to_dict())
    from benchmarks.safety.report import build_report

    planner = Planner(profile, out, ps, carried)
    if args.report_only:
        previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
        header["environment"] = previous.get("environment", header["environment"])
        if (out / "cache" / "alignment.json").exists():
            header["alignment"] = _alignment_summary(json.loads((out / "cache" / "alignment.json").read_text()))
        build_report(out, header, planner)
        return

    from benchmarks.safety.align import align, poison_pairs
    from benchmarks.safety.attack import Context
    from guardspace_pl.loading import load_causal_lm, load_tokenizer, resolve_model_source

    tag = "" if args.worker_index is None else f" w{args.worker_index}"

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}{tag} +{(time.time() - started) / 60:.1f} min] {message}", flush=True)

    original_dir, _ = resolve_model_source(MODEL)
    tokenizer = load_tokenizer(original_dir)
    cache = out / "cache"
    shared = claim(out, Job("shared", _Baseline("stages")))  # one worker makes the aligned start and poison answers
    while shared is None:
        time.sleep(10)
        shared = claim(out, Job("shared", _Baseline("stages")))
    try:
        original = load_causal_lm(original_dir).eval()
        log("poison answers from the original model")
        poison = poison_pairs(
            original, tokenizer, splits, profile, cache / f"poison_answers-{profile.poison_answer_tokens}.json"
        )
        del original
        log("the aligned start (safety patch, merged)")
        aligned_dir, alignment = align(original_dir, tokenizer, profile, args.data_dir, cache, args.patch)
    finally:
        shared.unlink(missing_ok=True)
    header["alignment"] = _alignment_summary(alignment)
    ctx = Context(
        profile, splits, aligned_dir, Path(alignment["patch"]), tokenizer, poison, out, args.threshold, device
    )
    max_jobs = args.jobs_per_process if args.worker_index is not None else None
    finished = sum(1 for _ in jobs_loop(planner, out, lambda job: run_job(job, ctx, original_dir), log, max_jobs))
    if max_jobs is not None and finished >= max_jobs:
        log(f"{finished} jobs done; handing over to a fresh process")
        sys.exit(RECYCLE_EXIT)
    header["environment"]["load_average_at_end"] = list(os.getloadavg())
    if args.worker_index is None:
        build_report(out, header, planner)
    log(f"done; results in {repo_relative(out)}")


def without_workers(argv: list[str]) -> list[str]:
    """``argv`` without its ``--workers N`` (the workers' own command line)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--workers":
            skip = True
        elif not item.startswith("--workers="):
            out.append(item)
    return out


def _alignment_summary(info: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in info.items() if k != "config"} | {"config_file": "configs/safety_patch_smollm2.yaml"}
    return summary | {"patch": repo_relative(Path(info["patch"]))}  # a committed file names no machine's folders


if __name__ == "__main__":
    main()
