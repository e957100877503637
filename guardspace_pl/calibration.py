"""Collect input covariances of LoRA layers on calibration prompts with forward hooks.

Layers that read the same tensor (q/k/v read one normed hidden state; gate/up another) are found
by tensor identity on the first forward pass and share one covariance, accumulated once.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from guardspace_pl.decomposition import SampleNormalization, sample_covariance
from guardspace_pl.distributed import all_reduce_max_, all_reduce_sum_, rank, reshard, world_size
from guardspace_pl.lora import LoraTarget

ForwardFn = Callable[[Tensor, Tensor], object]


@dataclass
class CovarianceGroup:
    """One distinct layer input and the layers that read it."""

    members: list[str]
    covariance: Optional[Tensor] = None  # n x n, float32 sum, then mean over samples
    num_samples: int = 0
    num_updates: int = 0  # accumulate calls: one per sample per group, however many members

    @property
    def name(self) -> str:
        return self.members[0]


class CovarianceCollector:
    """Forward pre-hooks on ``targets`` that accumulate ``(1/N) sum_i X^_i^T X^_i`` per distinct input.

    Use as a context manager around calibration forwards; call :meth:`begin_batch` before each.
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        normalization: SampleNormalization = "max",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.targets = list(targets)
        self.normalization = normalization
        # float64 makes numerically-null directions exactly reproducible across shard layouts (2x memory).
        self.dtype = dtype
        self.groups: list[CovarianceGroup] = []
        self._group_of: dict[str, int] = {}
        # id(tensor) -> (group, weakref): the weakref guards against a freed tensor's id being reused.
        self._pass_inputs: dict[int, tuple[int, weakref.ref]] = {}
        self._pass_done: set[int] = set()
        self._mask: Optional[Tensor] = None
        self._handles: list = []
        #: set while running padding forwards that must not count (see collect_covariances)
        self.paused = False

    def __enter__(self) -> "CovarianceCollector":
        for target in self.targets:
            self._handles.append(target.layer.register_forward_pre_hook(self._make_hook(target.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin_batch(self, attention_mask: Tensor) -> None:
        self._mask = attention_mask.bool()
        self._pass_inputs.clear()
        self._pass_done.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.paused:
                return
            x = args[0]
            seen = self._pass_inputs.get(id(x))
            same_tensor_gid = seen[0] if seen is not None and seen[1]() is x else None
            if name not in self._group_of:
                # First sight of this layer: join the group of a layer that read this very tensor.
                if same_tensor_gid is not None:
                    gid = same_tensor_gid
                    self.groups[gid].members.append(name)
                else:
                    gid = len(self.groups)
                    self.groups.append(CovarianceGroup(members=[name]))
                self._group_of[name] = gid
            gid = self._group_of[name]
            self._pass_inputs[id(x)] = (gid, weakref.ref(x))
            if gid in self._pass_done:
                return
            self._pass_done.add(gid)
            self._accumulate(self.groups[gid], x)

        return hook

    def _accumulate(self, group: CovarianceGroup, x: Tensor) -> None:
        x = x.detach()
        if x.ndim == 2:
            x = x.unsqueeze(0)
        mask = self._mask if self._mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        if group.covariance is None:
            group.covariance = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
        for sample, sample_mask in zip(x, mask.to(x.device)):
            group.covariance += sample_covariance(sample[sample_mask], self.normalization, self.dtype)
            group.num_samples += 1
        group.num_updates += 1

    def finalize(self) -> dict[str, CovarianceGroup]:
        """Sum over ranks and divide by the global sample count; returns ``{layer name: group}``."""
        missing = [t.name for t in self.targets if t.name not in self._group_of]
        if missing:
            raise RuntimeError(
                f"The calibration forward pass never reached LoRA layers {missing[:5]}: "
                "the forward function must run the whole model."
            )
        for group in self.groups:
            count = torch.tensor([float(group.num_samples)], dtype=torch.float64, device=group.covariance.device)
            all_reduce_sum_(group.covariance)
            all_reduce_sum_(count)
            group.num_samples = int(count.item())
            group.covariance /= group.num_samples
            if not torch.isfinite(group.covariance).all():
                raise ValueError(f"Non-finite covariance for the input of {group.members}.")
        return {name: self.groups[gid] for name, gid in self._group_of.items()}


def shard_for_rank(items: Sequence, rank_: Optional[int] = None, world: Optional[int] = None) -> list:
    """Strided share of the calibration samples for this rank (every rank gets at least one)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if len(items) < world:
        raise ValueError(
            f"{len(items)} calibration prompts cannot be split over {world} processes: give at least one per process."
        )
    return list(items[rank_::world])


def batches(token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device):
    """Right-padded ``(input_ids, attention_mask)`` batches, sorted by length to waste little padding."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = [token_ids[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        yield input_ids.to(device), mask.to(device)


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    targets: Sequence[LoraTarget],
    token_ids: Sequence[Sequence[int]],
    forward_fn: Optional[ForwardFn] = None,
    normalization: SampleNormalization = "max",
    batch_size: int = 8,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
    description: str = "Calibration",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, CovarianceGroup], list[CovarianceGroup]]:
    """Run this rank's share of the calibration prompts and return the globally reduced covariances.

    The model runs in eval mode (dropout off) and is put back in its previous mode afterwards; an FSDP2 model is left
    sharded.
    """
    local = shard_for_rank(token_ids)
    device = device or next(model.parameters()).device
    forward_fn = forward_fn or (lambda ids, mask: model(input_ids=ids, attention_mask=mask))
    was_training = model.training
    model.eval()
    collector = CovarianceCollector(targets, normalization, dtype)
    try:
        with collector:
            total = (len(local) + batch_size - 1) // batch_size
            # Sharded models all-gather weights inside every forward, so every rank must run as many forwards
            # as the busiest one: agree on that count first (before any forward), then pad with uncounted repeats.
            busiest = int(all_reduce_max_(torch.tensor([total], device=device)).item())
            bar = tqdm(
                batches(local, batch_size, pad_id, device),
                total=total,
                desc=description,
                disable=not progress or rank() != 0,
            )
            last = None
            for input_ids, mask in bar:
                collector.begin_batch(mask)
                forward_fn(input_ids, mask)
                last = (input_ids, mask)
            collector.paused = True
            for _ in range(busiest - total):
                forward_fn(*last)
    finally:
        model.train(was_training)
        reshard(model)  # FSDP2 keeps the root's parameters gathered after a forward: shard them again
    by_layer = collector.finalize()
    return by_layer, collector.groups


def fingerprint(*parts: object) -> str:
    """A short stable hash of settings, token ids and weight statistics, for cache file names."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]
