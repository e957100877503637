"""Resumable, rank-balanced training data: a per-epoch shuffling sampler (map-style) and a ``datasets`` stream.

Two guarantees, for both paths:

* every rank takes exactly the same number of batches per epoch, so no rank waits forever at a collective
  (gradient all-reduce, FSDP all-gather) that the others never reach;
* a run resumed from a mid-epoch checkpoint sees exactly the batches an uninterrupted run would have seen:
  the interrupted epoch is replayed in the same order with its consumed part skipped once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from datasets import Dataset as HFDataset
from datasets import IterableDataset as HFIterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset

from .sources import Example


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted epoch stopped: ``samples_consumed`` examples of ``epoch`` on each rank."""

    epoch: int
    samples_consumed: int


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded per-epoch shuffle, stride by rank, padded to equal length) that can skip
    the consumed part of an interrupted epoch, once.

    It *is* a ``DistributedSampler``, so Lightning keeps it under DDP/FSDP whatever ``use_distributed_sampler``
    says (Lightning only replaces samplers that are not); no ``DistributedSamplerWrapper`` re-shards it, which
    keeps the skip exact. ``len()`` stays the full per-rank length during the resumed epoch, as Lightning's
    restored batch counters expect: they continue from the checkpoint's count up to that length.

    Args:
        dataset: the map-style dataset to sample.
        num_replicas: the number of data-parallel ranks.
        rank: this rank.
        shuffle: shuffle per epoch (seeded with ``seed + epoch``).
        seed: the shuffle's seed, the same on every rank.
        resume: where an interrupted epoch stopped (its samples are skipped once), or None.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        resume: Optional[ResumePoint] = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume = resume
        if resume is not None:
            # The epoch is known now, before Lightning's set_epoch: worker processes may draw indices as soon as
            # the loader's iterator exists, which Lightning creates before it calls set_epoch on a resume.
            self.epoch = resume.epoch

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn at the first next(), after Lightning's set_epoch (single process).
        indices = list(super().__iter__())
        resume, self._resume = self._resume, None
        if resume is not None and resume.epoch == self.epoch:
            indices = indices[resume.samples_consumed :]
        yield from indices


def build_stream(
    examples: Sequence[Example],
    rank: int,
    world_size: int,
    seed: int,
    num_shards: int = 8,
    buffer_size: int = 1000,
) -> HFIterableDataset:
    """The examples as a shuffled ``datasets.IterableDataset``, split for ``rank`` of ``world_size``.

    Split with ``strategy="examples"``: every rank reads the same seeded shuffle and keeps one example in
    ``world_size``, so the ranks' examples are disjoint and each rank holds at least ``len // world_size`` of
    them (shard-wise splitting could hand one rank fewer, with no way to know without communication).
    """
    if not examples:
        raise ValueError("No training examples to stream; check the task source and num_task_samples.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}.")
    rows = [{"prompt": e.prompt, "response": e.response} for e in examples]
    stream = HFDataset.from_list(rows).to_iterable_dataset(num_shards=max(1, min(num_shards, len(rows))))
    # The same seed on every rank: the ranks must agree on the shuffled order they each take a stride of.
    stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="examples")


def examples_per_rank(total: int, world_size: int) -> int:
    """Examples every rank takes per epoch: ``total // world_size``, known on every rank without communication."""
    per_rank = total // world_size
    if per_rank < 1:
        raise ValueError(
            f"{total} training examples cannot give each of {world_size} ranks one; raise num_task_samples or use "
            "fewer devices."
        )
    return per_rank


class RankBalancedStream(TorchIterableDataset):
    """Batches of one rank's stream, exactly ``ceil(examples_per_rank / batch_size)`` of them per epoch.

    Batching happens here (use it with ``DataLoader(batch_size=None)``): with ``num_workers > 0``, batch ``j``
    is built by worker ``j % num_workers``, which is the order in which the DataLoader collects them, so the
    batch sequence does not depend on the number of workers. ``make_batch`` tokenizes and collates lazily.

    Args:
        stream: this rank's ``datasets.IterableDataset`` (``prompt``/``response`` columns).
        num_examples: examples per rank and epoch (the count every rank shares).
        batch_size: examples per batch.
        make_batch: turns a list of examples into a batch (tokenize and collate).
        resume: where an interrupted epoch stopped (its batches are skipped once), or None.
    """

    def __init__(
        self,
        stream: HFIterableDataset,
        num_examples: int,
        batch_size: int,
        make_batch: Callable[[list[Example]], Any],
        resume: Optional[ResumePoint] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.stream = stream
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.make_batch = make_batch
        self.epoch = resume.epoch if resume is not None else 0
        self._resume = resume

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeds the shuffle; Lightning does not call this for iterable datasets: ``EpochLoader`` does."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def _example_batches(self) -> Iterator[list[Example]]:
        self.stream.set_epoch(self.epoch)
        # ``.iter`` rather than ``iter()``: inside a DataLoader worker, ``iter()`` would let ``datasets`` hand
        # each worker only some shards, and the rank's batch count would then depend on the shard sizes.
        columns = self.stream.iter(batch_size=self.batch_size)
        rows = (Example(p, r) for batch in columns for p, r in zip(batch["prompt"], batch["response"]))
        # Truncate to the count every rank shares: the ranks that hold one example more drop it.
        rows = islice(rows, self.num_examples)
        while chunk := list(islice(rows, self.batch_size)):
            yield chunk

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume.epoch == self.epoch:
            # Checkpoints fall on batch boundaries, so the consumed examples are whole batches.
            skip = resume.samples_consumed // self.batch_size
        for index, chunk in enumerate(self._example_batches()):
            if index >= skip and (index - skip) % num_workers == worker_id:
                yield self.make_batch(chunk)


class EpochLoader(DataLoader):
    """A DataLoader that tells its iterable dataset the current epoch each time an iterator is made.

    Lightning calls ``set_epoch`` only on samplers, and an iterable dataset has none; worker processes receive a
    copy of the dataset when the iterator is created, so the epoch must be set before that.
    """

    def __init__(self, dataset: RankBalancedStream, epoch_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()


class BatchList(TorchIterableDataset):
    """Precomputed batches served in order. Iterable, so Lightning adds no sampler: the split per rank is done."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


def rank_share(items: Sequence[Any], rank: int, world_size: int) -> tuple[list[Any], list[float]]:
    """This rank's items (a stride) padded to ``ceil(len / world_size)``, and weights (0 on padding).

    Every rank then runs the same number of batches, and the padding rows, which repeat a real item so that
    generation does the same work, count for nothing.
    """
    if not items:
        return [], []
    mine = list(items[rank::world_size])
    target = math.ceil(len(items) / world_size)
    weights = [1.0] * len(mine) + [0.0] * (target - len(mine))
    return mine + [items[0]] * (target - len(mine)), weights


def chunk(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def weights_tensor(weights: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(weights), dtype=torch.float32)
