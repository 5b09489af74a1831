"""DTensor (FSDP2, tensor parallel): the average of a sharded parameter is a DTensor over a local shard.

The shard lives in the average's flat buffer and is presented as a DTensor with the parameter's mesh,
placements, shape and stride, so ``torch.distributed.checkpoint`` saves it sharded and reshards it on load.
Updates read and write local shards only (no collective). FSDP2 may keep a root's parameters gathered after a
forward without backward, swapping tensors in the module dicts without any event: such tensors are
``volatile`` and the plan checks their identity on every update (at C speed).
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import Engine

__all__ = ["DTensorEngine", "is_dtensor", "local_shard"]


def _loaded(module: str, name: str) -> Any:
    """``module.name`` if that module was imported, else None: nothing can be a DTensor (an FSDP2 module)
    before torch.distributed.tensor (.fsdp) is imported, and importing it would slow ``import polyak``."""
    return getattr(sys.modules.get(module), name, None)


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters are)."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


# A DTensor's local shard: the same object on every call while the DTensor keeps its storage, so a cached
# pairing can check it by identity (``DTensor.to_local()`` returns a fresh view for parameters).
local_shard = operator.attrgetter("_local_tensor")


class DTensorEngine(Engine):
    """DTensor parameters and buffers: this rank's local shard, presented as a DTensor laid out like the model's."""

    name = "DTensor"
    sharded = True
    volatile = True

    def claims(self, tensor: Any) -> bool:
        return is_dtensor(tensor)

    def local(self, tensor: Tensor) -> Tensor:
        return local_shard(tensor)

    def present(self, view: Tensor, tensor: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            view,
            tensor.device_mesh,  # type: ignore[attr-defined]
            tensor.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=tensor.shape,
            stride=tensor.stride(),
        )

    def check_pair(self, name: str, stored: Tensor, tensor: Tensor) -> None:
        same = stored.device_mesh == tensor.device_mesh and stored.placements == tensor.placements  # type: ignore[attr-defined]
        if not same or stored.shape != tensor.shape:
            layout = "{0.placements} on {0.device_mesh}"
            raise ValueError(
                f"tensor {name!r}: the average is laid out as {layout.format(stored)}, the model as "
                f"{layout.format(tensor)}; shard the model as when the average was made"
            )

    def check_saved(self, name: str, saved: Tensor, held: Tensor) -> None:
        if is_dtensor(saved) and (saved.device_mesh, saved.placements) != (held.device_mesh, held.placements):  # type: ignore[attr-defined]
            layout = "{0.placements} on {0.device_mesh}"
            raise ValueError(
                f"saved tensor {name!r} is laid out as {layout.format(saved)}, this average as {layout.format(held)}; "
                "load a sharded state through torch.distributed.checkpoint (dcp.load into averager.state_dict(), "
                "which reshards), or give full tensors (polyak.distributed.full_state_dict)"
            )

    def agree(self, flag: Tensor, tensors: list[Tensor]) -> Tensor:
        meshes = {id(t.device_mesh): t.device_mesh for t in tensors}  # type: ignore[attr-defined]
        agreed = flag.to(torch.int32)
        for mesh in meshes.values():
            for group in mesh.get_all_groups():
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        return agreed.bool()

    def gather(self, stored: Tensor, tensor: Tensor | None) -> Tensor:
        return stored.full_tensor()  # type: ignore[attr-defined]

    def scatter(self, full: Tensor, stored: Tensor, tensor: Tensor) -> Tensor:
        if is_dtensor(full):
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, stored.device_mesh, stored.placements, src_data_rank=None)  # type: ignore[attr-defined]

    def release(self, module: nn.Module) -> None:
        fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
        if fsdp_module is None:
            return
        for m in module.modules():
            if isinstance(m, fsdp_module):
                m.reshard()
