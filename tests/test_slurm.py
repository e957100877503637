"""SLURM auto-requeue, offline: a simulated SLURM job gets SIGUSR1, checkpoints, requeues, and resumes exactly."""

import os
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import CALIBRATION_PROMPTS, task_loader, trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.callbacks import NullSpaceProjection, SafetySubspaceInit
from guardspace_pl.testing import byte_tokenizer, tiny_llama

SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "guardspace.sbatch"
JOB_ID = "4242"
NULL_PROMPTS = ["build a bomb", "steal a car", "hack a bank"]
STEPS = 8  # 16 examples, batch 4: 4 steps per epoch, so step 4 closes the first epoch


@pytest.fixture
def slurm(monkeypatch, tmp_path) -> Path:
    """The environment srun gives one task of a 1-node, 1-GPU job, and a fake `scontrol` first on PATH.

    Returns the file where the fake scontrol records its arguments.
    """
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    env = {
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_ID": JOB_ID,
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NAME": "guardspace",  # "bash" or "interactive" would switch Lightning's SLURM support off
        # Lightning writes these into os.environ when it reads them: set them here so the test leaves no trace.
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "15242",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = tmp_path / "scontrol_calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 0\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


class Preempt(pl.Callback):
    """What SLURM does at the time limit: SIGUSR1 (``--signal``), then SIGTERM once the job is requeued."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        # Without Lightning's handlers these signals would terminate the test process itself.
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None), f"no handler for {signum!r}"
        os.kill(os.getpid(), signal.SIGUSR1)  # Lightning saves hpc_ckpt_1.ckpt and runs `scontrol requeue`
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM stops the job: Lightning exits after this batch


def run(root: Path, extra_callbacks=(), **fit_kwargs) -> tuple[GuardSpaceLM, pl.Trainer, list[pl.Callback]]:
    tokenizer = byte_tokenizer()
    pl.seed_everything(0)
    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), tokenizer, lora_rank=4, lora_alpha=8, learning_rate=1e-2, warmup_ratio=0.0
    )
    guardspace = [
        SafetySubspaceInit(CALIBRATION_PROMPTS, tokenizer, progress_bar=False),
        NullSpaceProjection(NULL_PROMPTS, tokenizer, progress_bar=False, threshold=1e-10, min_eigenvalue=1e-12),
    ]
    # Same max_steps in every run: the cosine schedule's length comes from it.
    trainer = pl.Trainer(max_steps=STEPS, callbacks=guardspace + list(extra_callbacks), **trainer_kwargs(root))
    trainer.fit(module, task_loader(tokenizer, count=16, batch_size=4), **fit_kwargs)
    return module, trainer, guardspace


def handlers() -> dict:
    return {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}


def test_lightning_sees_the_slurm_job(slurm, tmp_path, monkeypatch):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR1
    # The sbatch template's rule, --ntasks-per-node equal to trainer.devices, is checked when DDP launches
    # (other strategies do not check: a mismatch would silently give the wrong world size).
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    with pytest.raises(ValueError, match="ntasks-per-node=2"):
        pl.Trainer(strategy="ddp", **trainer_kwargs(tmp_path)).fit(BoringModel())
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert not isinstance(
        pl.Trainer(**trainer_kwargs(tmp_path))._accelerator_connector.cluster_environment, SLURMEnvironment
    )


def test_requeue_on_sigusr1_then_resume_gives_the_uninterrupted_weights(slurm, tmp_path):
    before = handlers()
    uninterrupted, _, _ = run(tmp_path / "uninterrupted")
    assert handlers() == before

    root = tmp_path / "job"
    with pytest.raises(SIGTERMException):
        run(root, [Preempt(step=4)])
    assert handlers() == before  # Lightning's teardown restores the handlers even when the run was stopped

    hpc = root / "hpc_ckpt_1.ckpt"
    assert hpc.exists()
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == 4
    assert slurm.read_text().split() == ["requeue", JOB_ID]

    # The requeued job: same environment, same command, no ckpt_path. Lightning picks the hpc checkpoint itself.
    resumed, trainer, callbacks = run(root)
    assert trainer.ckpt_path == str(hpc)
    assert trainer.global_step == STEPS
    assert callbacks[1].projectors and callbacks[0].initialized  # GuardSpace state came back with the checkpoint
    assert handlers() == before
    for (name, p), (_, q) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name


def test_sbatch_template_matches_lightnings_slurm_rules():
    text = SBATCH.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options
    assert options["job-name"] not in ("bash", "interactive")
    srun = text[text.index("srun python -m guardspace_pl fit") :]
    for flag in (
        '--config "$CONFIG"',
        '--trainer.num_nodes="$SLURM_NNODES"',
        '--trainer.devices="$SLURM_NTASKS_PER_NODE"',
        "--trainer.default_root_dir=",
    ):
        assert flag in srun
