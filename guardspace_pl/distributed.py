"""Small helpers that make the same code run unsharded, under DDP, and under FSDP2 (DTensor)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor; the tensor itself otherwise)."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t.data if isinstance(t, torch.nn.Parameter) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard (the tensor itself when not sharded)."""
    if isinstance(t, DTensor):
        return t.to_local()
    return t.data if isinstance(t, torch.nn.Parameter) else t


@torch.no_grad()
def write_full_(param: Tensor, full: Tensor) -> None:
    """Write a full tensor into ``param`` in place; under FSDP2 each rank keeps only its own shard."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds ``full`` already, so each slices locally, no communication.
        shard = distribute_tensor(
            full.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(shard.to_local())
    else:
        local_tensor(param).copy_(full)


def reshard(model: torch.nn.Module) -> None:
    """Give every FSDP2 module in ``model`` its sharded parameters back (a no-op when nothing is gathered).

    FSDP2 leaves the root module's parameters (embeddings, norm, head) gathered after a forward, expecting the
    backward to follow; after a forward outside training (calibration, generation) they would stay whole, and a
    write into them (``write_full_``) would be lost at the next reshard. Local: no communication.

    Args:
        model: any module, sharded or not.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_sum_(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_(t: Tensor, src: int) -> Tensor:
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box: list[Optional[Any]] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
