"""DeepSpeed ZeRO-3: the average of a partitioned parameter is this rank's partition of it.

Under ZeRO-3 a parameter outside a gather is a 0-element placeholder; this rank's data is its partition
``p.ds_tensor``, a 1-d tensor of ``ceil(ds_numel / world)`` elements, rank r holding the flat elements
``[r*k, (r+1)*k)``; the last partitions are padded past ``ds_numel``. The shadow averages
:func:`partition` (the valid elements only, a view that aliases ``ds_tensor``), so the padding never enters the
average and an update needs no collective. Parameters that DeepSpeed keeps whole (``ds_persist``, below
``stage3_param_persistence_threshold``) are averaged the same way: DeepSpeed keeps their partitions current (it
gathers them from there after each step) and partitions them again now and then (``GatheredParameters``,
checkpoints), so only the partition is always there to read.

ZeRO-1/2 parameters are whole, ordinary tensors: nothing here applies to them.
Nothing imports DeepSpeed: a module that was never imported cannot have made ZeRO-3 parameters.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import Engine

__all__ = ["ZeroEngine", "is_engine", "is_partitioned", "partition"]


def _status(name: str) -> Any:
    status = getattr(sys.modules.get("deepspeed.runtime.zero.partition_parameters"), "ZeroParamStatus", None)
    return getattr(status, name, None)


def is_engine(module: nn.Module) -> bool:
    """True for a ``deepspeed.DeepSpeedEngine`` (its model is ``engine.module``)."""
    engine = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    return engine is not None and isinstance(module, engine)


def is_partitioned(tensor: Any) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions (whether gathered now or not)."""
    return hasattr(tensor, "ds_tensor") and hasattr(tensor, "ds_numel")


def _describe(p: Any) -> str:
    return f"ds_id={getattr(p, 'ds_id', '?')}, ds_shape={tuple(getattr(p, 'ds_shape', ()))}"


def _extent(p: Any) -> tuple[int, int, int]:
    """(rank in the partition group, partition size k, valid elements of this rank's partition)."""
    group = getattr(p, "ds_process_group", None)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    k = -(-int(p.ds_numel) // world)
    return rank, k, max(0, min(k, int(p.ds_numel) - rank * k))


def partition(p: Tensor) -> Tensor:
    """This rank's valid elements of a partitioned ZeRO-3 parameter: a 1-d view of ``p.ds_tensor`` (no padding).

    Raises ``RuntimeError`` for a parameter whose partition is not in memory as a plain tensor of the expected
    size (NVMe offload, quantized weights, a resized partition): polyak would average the wrong values.
    """
    stored = getattr(p, "ds_tensor", None)
    location = getattr(stored, "final_location", None)
    problem = None
    if not isinstance(stored, Tensor):
        problem = "has no partition (ds_tensor is None)"
    elif location is not None and "nvme" in str(location).lower():
        problem = "keeps its partition on NVMe (offload_param to nvme)"
    elif hasattr(stored, "ds_quant_scale"):
        problem = "holds a quantized partition (zero_quantized_nontrainable_weights)"
    if problem is None:
        _, k, valid = _extent(p)
        if stored.dim() != 1 or stored.numel() != k:  # type: ignore[union-attr]
            problem = f"has a partition of shape {tuple(stored.shape)}, expected ({k},)"  # type: ignore[union-attr]
        else:
            return stored.narrow(0, 0, valid)  # type: ignore[union-attr]
    raise RuntimeError(
        f"DeepSpeed ZeRO-3 parameter ({_describe(p)}) {problem}; polyak averages ZeRO-3 partitions held in "
        "memory (GPU or CPU offload) only. Exclude it with exclude=[...] or change the DeepSpeed config"
    )


def _params(module: nn.Module) -> list[Any]:
    return [p for p in module.parameters() if is_partitioned(p)]


class ZeroEngine(Engine):
    """DeepSpeed ZeRO-3 parameters: the valid elements of this rank's partition, a plain 1-d tensor."""

    name = "ZeRO-3"
    sharded = True

    def claims(self, tensor: Any) -> bool:
        return is_partitioned(tensor)

    def local(self, tensor: Tensor) -> Tensor:
        return partition(tensor)

    def stored_shape(self, tensor: Tensor) -> torch.Size:
        return partition(tensor).shape

    def anchors(self, tensor: Tensor) -> list[Tensor]:
        return [tensor.ds_tensor]  # type: ignore[attr-defined]  # DeepSpeed moves it with ds_tensor.data = ...

    def agree(self, flag: Tensor, tensors: list[Tensor]) -> Tensor:
        groups = {id(g): g for g in (getattr(t, "ds_process_group", None) for t in tensors)}
        agreed = flag.to(torch.int32)
        for group in groups.values():
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        return agreed.bool()

    def gather(self, stored: Tensor, tensor: Tensor | None) -> Tensor:
        """The full tensor (shape ``ds_shape``) whose this-rank part is ``stored``: one all-gather of ``k``
        elements per rank over the parameter's partition group."""
        if tensor is None:
            raise ValueError("gathering a ZeRO-3 partition needs the model's parameter; pass model=")
        p: Any = tensor
        group = getattr(p, "ds_process_group", None)
        _, k, valid = _extent(p)
        world = dist.get_world_size(group)
        padded = torch.zeros(k, dtype=stored.dtype, device=stored.device)
        padded[:valid].copy_(stored.reshape(-1))
        full = torch.empty(world * k, dtype=stored.dtype, device=stored.device)
        dist.all_gather_into_tensor(full, padded, group=group)
        return full[: int(p.ds_numel)].view(tuple(p.ds_shape))

    def identity(self, tensor: Tensor) -> dict[str, Any] | None:
        """This rank and the world size of the partition group: with each tensor's size, they fix its elements."""
        group = getattr(tensor, "ds_process_group", None)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
        return {"engine": self.name, "rank": rank, "world": world}

    @torch.no_grad()
    def release(self, module: nn.Module) -> None:
        """Release ``module``'s gathered ZeRO-3 parameters (no collective; nothing is copied back).

        After an evaluation forward, and for the parameters DeepSpeed keeps whole, the gathered copy would hide a
        partition that the shadow writes (``swapped``, ``copy_to``); released, the next forward gathers the
        partitions again. A parameter in flight (mid-gather) raises ``RuntimeError``.
        """
        params = _params(module)
        if not params:
            return
        available, pending = _status("AVAILABLE"), _status("NOT_AVAILABLE")
        inflight = [p for p in params if p.ds_status not in (available, pending)]
        if inflight:
            raise RuntimeError(
                f"DeepSpeed ZeRO-3 parameter ({_describe(inflight[0])}) is being gathered ({inflight[0].ds_status}); "
                "build, update or swap the average between forward passes, not inside one"
            )
        gathered = [p for p in params if p.ds_status == available]
        if gathered:
            gathered[0].partition(param_list=gathered)
