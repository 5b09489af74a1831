"""Where a model tensor's data lives: one small adapter per engine (plain, DTensor/FSDP2, DeepSpeed ZeRO-3).

The plan asks the adapter of each model tensor (:func:`engine_of`) everything that depends on sharding, so
nothing above this package branches on the engine:

- ``local``: the plain tensor holding this rank's data (aliasing it), which the kernels read and write;
- ``stored_shape`` / ``present``: the shape the average keeps, and what users see of it (a DTensor for FSDP2);
- ``check_pair``: whether a stored tensor still fits the model's (same sharding and layout);
- ``check_saved``: whether a saved tensor can load into a stored one (a DTensor of the same layout);
- ``agree``: a 0-d flag and-ed over the ranks that share the tensors (one skip decision for all ranks);
- ``gather`` / ``scatter``: the full tensor for export, this rank's part of a full tensor on load;
- ``identity``: which part of the whole this rank holds, saved with a sharded state and checked on load;
- ``anchors``: tensors besides the parameter whose replacement moves its data (watched with it);
- ``release``: put gathered parameters back in their sharded state.

A new engine is one more adapter in :data:`ENGINES`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ENGINES", "Engine", "engine_of", "release"]


class Engine:
    """Plain tensors, whole on every rank (also DDP and ZeRO-1/2): the adapter every other one refines."""

    name = "plain"
    sharded = False  # each rank holds only a share of the tensors it claims
    volatile = False  # the engine swaps tensors in module dicts without an event: re-checked every update

    def claims(self, tensor: Any) -> bool:
        """True for tensors this adapter handles."""
        if getattr(tensor, "_fsdp_flattened", False):
            raise RuntimeError(
                f"FSDP1 (FullyShardedDataParallel) parameter of shape {tuple(tensor.shape)}: its data is a flat "
                "fragment of several parameters, which polyak cannot pair with the model's tensors by name. Shard "
                "with FSDP2 (torch.distributed.fsdp.fully_shard), which polyak averages shard by shard"
            )
        return True

    def local(self, tensor: Tensor) -> Tensor:
        """The plain tensor that holds this rank's data, aliasing it."""
        return tensor

    def stored_shape(self, tensor: Tensor) -> torch.Size:
        """The shape the average keeps for ``tensor``."""
        return tensor.shape

    def anchors(self, tensor: Tensor) -> list[Tensor]:
        """Tensors besides ``tensor`` whose replacement moves its data (watched for changes with it)."""
        return []

    def present(self, view: Tensor, tensor: Tensor) -> Tensor:
        """What users see of a stored ``view`` of ``tensor``'s average."""
        return view

    def check_pair(self, name: str, stored: Tensor, tensor: Tensor) -> None:
        """Raise ``ValueError`` naming the tensor when ``stored`` (as presented) is laid out unlike ``tensor``;
        the plan has checked already that both have this engine and the same stored shape."""

    def check_saved(self, name: str, saved: Tensor, held: Tensor) -> None:
        """Raise ``ValueError`` naming the tensor when a ``saved`` tensor of ``held``'s shape and dtype is laid
        out so that it cannot load into ``held`` (an average as presented)."""

    def agree(self, flag: Tensor, tensors: list[Tensor]) -> Tensor:
        """``flag`` and-ed over every rank that holds a share of ``tensors`` (no collective for plain tensors)."""
        return flag

    def gather(self, stored: Tensor, tensor: Tensor | None) -> Tensor:
        """The full tensor whose this-rank part is ``stored`` (a collective for sharded engines)."""
        return stored

    def scatter(self, full: Tensor, stored: Tensor, tensor: Tensor) -> Tensor:
        """What to copy into ``stored`` from a saved ``full`` tensor (this rank's part of it)."""
        return full

    def identity(self, tensor: Tensor) -> dict[str, Any] | None:
        """Which part of the whole this rank's data is (None: the whole tensor)."""
        return None

    def release(self, module: nn.Module) -> None:
        """Put the engine's gathered parameters of ``module`` back in their sharded state (no collective)."""


PLAIN = Engine()


def _engines() -> list[Engine]:
    from .dtensor import DTensorEngine
    from .zero3 import ZeroEngine

    return [DTensorEngine(), ZeroEngine(), PLAIN]


ENGINES: list[Engine] = []


def engine_of(tensor: Tensor) -> Engine:
    """The adapter of ``tensor``: the first of :data:`ENGINES` that claims it."""
    if not ENGINES:
        ENGINES.extend(_engines())
    for engine in ENGINES:
        if engine.claims(tensor):
            return engine
    return PLAIN


def release(module: nn.Module) -> None:
    """Every engine's gathered parameters of ``module`` back in their sharded state (no collective)."""
    if not ENGINES:
        ENGINES.extend(_engines())
    for engine in ENGINES:
        engine.release(module)
