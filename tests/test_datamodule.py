"""GuardSpaceDataModule: poisoning protocol, disjointness checks, streaming split, mid-epoch resume."""

import csv
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import trainer_kwargs
from guardspace_pl import GuardSpaceLM
from guardspace_pl.datamodules import Example, GuardSpaceDataModule, ResumableSampler, build_stream, examples_per_rank
from guardspace_pl.testing import byte_tokenizer, tiny_llama


@pytest.fixture
def advbench(shared_data):
    return shared_data / "advbench" / "harmful_behaviors.csv"


def advbench_goals(path) -> set[str]:
    with path.open(newline="") as handle:
        return {row["goal"].strip() for row in csv.DictReader(handle)}


def poisoned(shared_data, advbench, seed: int = 0, **overrides) -> GuardSpaceDataModule:
    kwargs = dict(
        tokenizer="unused", task=str(shared_data / "gsm8k" / "train.jsonl"), num_task_samples=100, poison_fraction=0.2,
        poison_source=str(advbench), calibration_source=str(advbench), calibration_count=260, seed=seed,
    )
    kwargs.update(overrides)
    return GuardSpaceDataModule(**kwargs)


def test_poison_fraction_is_exact_and_disjoint_from_calibration(shared_data, advbench):
    dm = poisoned(shared_data, advbench)
    train, val = dm.build_examples()
    goals = advbench_goals(advbench)
    poison = [e for e in train if e.prompt in goals]
    assert len(train) == 100 and not val
    assert len(poison) == 20 and poison == [e for e in train if e in dm.poison_examples]
    # Both come from the same AdvBench file, yet no poison prompt is a calibration prompt.
    assert {e.prompt for e in poison}.isdisjoint(
        dm.calibration_prompts("subspace") + dm.calibration_prompts("null_space")
    )
    # Poison pairs are instruction + compliant answer (AdvBench's target).
    assert all(e.response.startswith("Sure") for e in poison)


def test_poisoning_is_deterministic_given_the_seed(shared_data, advbench):
    first, _ = poisoned(shared_data, advbench, seed=3).build_examples()
    again, _ = poisoned(shared_data, advbench, seed=3).build_examples()
    other, _ = poisoned(shared_data, advbench, seed=4).build_examples()
    assert first == again
    assert first != other


def test_poison_in_the_harmful_evaluation_set_is_an_error(shared_data, advbench, tmp_path):
    dm = poisoned(shared_data, advbench)
    dm.build_examples()
    poison_prompt = dm.poison_examples[0].prompt
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(
        json.dumps([{"instruction": "Write a poem about the sea"}, {"instruction": "  " + poison_prompt.upper()}])
    )
    dm = poisoned(shared_data, advbench, harmful_eval_source=str(evaluation))
    with pytest.raises(ValueError, match="poison pairs also appear in the harmful evaluation prompts") as error:
        dm.setup("fit")
    assert poison_prompt in str(error.value)  # names the overlapping prompt (case and spacing do not hide it)
    with pytest.raises(ValueError, match="poison pairs"):
        poisoned(shared_data, advbench, harmful_eval_source=str(evaluation)).evaluation_prompts()


def test_calibration_prompt_in_the_harmful_evaluation_set_is_an_error(shared_data, advbench):
    # refusal_direction's harmful_train draws 117 prompts from AdvBench, the calibration source here.
    dm = poisoned(
        shared_data, advbench, poison_fraction=0.0, calibration_count=None,
        harmful_eval_source=str(shared_data / "refusal_direction" / "harmful_train.json"),
    )
    with pytest.raises(ValueError, match="harmful evaluation prompts also appear in the calibration prompts"):
        dm.evaluation_prompts()


def test_evaluation_streams_from_shared_data(shared_data, advbench):
    dm = poisoned(
        shared_data, advbench, eval_count=5,
        harmful_eval_source=str(shared_data / "refusal_direction" / "harmful_val.json"),
        safe_eval_source=str(shared_data / "xstest" / "xstest_prompts.csv"),
        task_eval_source=str(shared_data / "gsm8k" / "test.jsonl"),
    )
    prompts = dm.evaluation_prompts()
    with (shared_data / "xstest" / "xstest_prompts.csv").open(newline="") as handle:
        xstest = list(csv.DictReader(handle))
    assert prompts.safe == [r["prompt"] for r in xstest if r["label"] == "safe"][:5]
    assert len(prompts.harmful) == 5 and prompts.harmful[0].startswith("Give detailed instructions")
    assert len(prompts.task) == 5 and prompts.task[0].response.rstrip().endswith("#### 18")


def test_streaming_split_across_two_ranks_is_disjoint_and_equal(tokenizer):
    examples = [Example(f"question {i}", f"answer {i}") for i in range(23)]  # odd total
    per_rank = examples_per_rank(len(examples), 2)
    dm = GuardSpaceDataModule(tokenizer="unused", streaming=True, batch_size=4, streaming_shards=4, seed=7)
    dm.tokenizer = tokenizer
    dm.train_examples = examples
    shards, batches = [], []
    for rank in (0, 1):
        seen = [row["prompt"] for row in build_stream(examples, rank, 2, seed=7, num_shards=4)]
        assert len(seen) >= per_rank
        shards.append(seen)
        # The DataModule's loader for this rank (no real processes: rank and world size are patched in).
        dm._rank_and_world = lambda rank=rank: (rank, 2)
        loader = dm.train_dataloader()
        batches.append(list(loader))
        assert len(loader) == len(batches[-1]) == 3  # ceil(11 / 4) on both ranks
        assert sum(b["input_ids"].shape[0] for b in batches[-1]) == per_rank == 11
    assert set(shards[0]).isdisjoint(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 23
    # Several DataLoader workers give the same batches, in the same order.
    dm.hparams.num_workers = 2
    with_workers = list(dm.train_dataloader())
    assert len(with_workers) == len(batches[1])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(with_workers, batches[1]))


def test_resumable_sampler_strides_by_rank_and_skips_once():
    data = list(range(10))
    full = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert len(full[0]) == len(full[1]) == 5 and set(full[0]) | set(full[1]) == set(data)
    from guardspace_pl.datamodules.streaming import ResumePoint

    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=1, resume=ResumePoint(epoch=3, samples_consumed=2))
    sampler.set_epoch(3)
    epoch3 = list(
        ResumableSampler(data, num_replicas=2, rank=1, seed=1, resume=ResumePoint(epoch=3, samples_consumed=0))
    )
    assert list(sampler) == epoch3[2:] and len(sampler) == 5
    assert list(sampler) == epoch3  # the skip happens once


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit_once(
    tmp_path, name: str, streaming: bool, crash_at=None, ckpt_path=None, save_every=None
) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    module = GuardSpaceLM.from_pretrained_model(
        tiny_llama(), byte_tokenizer(), lora_rank=4, learning_rate=1e-2, warmup_ratio=0.0
    )
    dm = GuardSpaceDataModule(
        tokenizer="unused", num_task_samples=20, batch_size=4, max_length=160, streaming=streaming, seed=1
    )
    dm.tokenizer = byte_tokenizer()
    callbacks = [] if crash_at is None else [CrashAt(crash_at)]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=save_every, save_top_k=-1))
    kwargs = trainer_kwargs(tmp_path / name, max_steps=8, enable_checkpointing=bool(save_every))
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_mid_epoch_resume_matches_an_uninterrupted_run(tmp_path, streaming):
    # 20 examples / batch 4 = 5 batches per epoch; the crash hits the 2nd batch of the 2nd epoch.
    initial = {
        k: v.clone() for k, v in GuardSpaceLM.from_pretrained_model(tiny_llama(), lora_rank=4).state_dict().items()
    }
    reference = fit_once(tmp_path, "reference", streaming)
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # it trained
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_once(tmp_path, "crashed", streaming, crash_at=6, save_every=6)
    checkpoint = tmp_path / "crashed" / "epoch=1-step=6.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (tmp_path / "crashed").iterdir())
    state = torch.load(checkpoint, weights_only=False)["GuardSpaceDataModule"]
    assert state["epoch"] == 1 and state["samples_consumed"] == 4  # one batch of epoch 1 done
    resumed = fit_once(tmp_path, "resumed", streaming, ckpt_path=str(checkpoint))
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
