"""Where the K averages' tensors live: flat buffers of their own, or a live target module's own tensors.

:func:`allocate` gives each selected model tensor K views into flat buffers, one set per (device, dtype, mode,
model dtype and device), laid out like the model's tensor; :func:`in_target` makes a target module's tensors the
storage of one average, where :func:`fits` says they can hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .module_tensors import Found, walk
from .options import Options, Policy
from .plan import Slot
from .storage import engine_of

__all__ = ["allocate", "fits", "in_target"]

Chosen = Sequence[tuple[Found, Policy]]


def _laid_out_like(piece: Tensor, tensor: Tensor) -> Tensor:
    """The flat ``piece`` viewed with ``tensor``'s shape and, when dense (e.g. channels_last), its strides too:
    an average laid out like its model is read and written in the same memory order, not strided."""
    if tensor.is_contiguous():
        return piece.view(tensor.shape)
    # empty_like keeps the strides of a dense tensor exactly and makes its own for any other
    dense = torch.empty_like(tensor, device="meta").stride() == tensor.stride()
    return piece.as_strided(tensor.shape, tensor.stride()) if dense else piece.view(tensor.shape)


def fits(chosen: Chosen, target: nn.Module, options: Options, count: int) -> bool:
    """True when ``target``'s own tensors can hold the averages: one average, rounded to nearest, every tensor
    there in its storage dtype (and on ``options.device`` if given)."""
    theirs = {f.name: f.tensor for f in walk(target)[0]}
    return (
        count == 1
        and options.rounding == "nearest"
        and all(
            f.name in theirs
            and theirs[f.name].dtype == options.storage_dtype(f.tensor, mode)
            and (options.device is None or theirs[f.name].device == options.device)
            for f, mode in chosen
        )
    )


def in_target(chosen: Chosen, target: nn.Module) -> list[Slot]:
    """One average stored in ``target``'s own tensors, paired by name with the chosen model tensors."""
    theirs = {f.name: f.tensor for f in walk(target)[0]}
    slots = []
    for f, mode in chosen:
        tensor = theirs[f.name]
        stored = engine_of(tensor).local(tensor.detach())
        slots.append(Slot(f.name, mode, engine_of(f.tensor).name, [stored], [tensor.detach()], f.tensor.dtype))
    return slots


def allocate(chosen: Chosen, options: Options, count: int) -> list[Slot]:
    """K flat buffers per (device, dtype, mode, model dtype and device); slots are views, in storage order."""
    groups: dict[tuple[Any, ...], list[tuple[Found, Policy]]] = {}
    for f, mode in chosen:
        device = options.device if options.device is not None else f.tensor.device
        dtype = options.storage_dtype(f.tensor, mode)
        groups.setdefault((str(device), dtype, mode, f.tensor.dtype, str(f.tensor.device)), []).append((f, mode))
    slots: list[Slot] = []
    for (device, dtype, mode, model_dtype, _), members in groups.items():
        engines = [engine_of(f.tensor) for f, _ in members]
        shards = [engine.local(f.tensor) for engine, (f, _) in zip(engines, members, strict=True)]
        flats = [torch.empty(sum(t.numel() for t in shards), dtype=dtype, device=device) for _ in range(count)]
        offset = 0
        for engine, (f, _), shard in zip(engines, members, shards, strict=True):
            n = shard.numel()
            stored = [_laid_out_like(flat[offset : offset + n], shard) for flat in flats]
            values = [engine.present(view, f.tensor) for view in stored]
            slots.append(Slot(f.name, mode, engine.name, stored, values, model_dtype))
            offset += n
    return slots
