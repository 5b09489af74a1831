"""The references every ratio is read against: the floor (one ``lerp_`` over a flat float32 buffer with as many
elements as the model averages: no update can move less memory), a ``copy_`` of the same buffer (bandwidth),
and a bare ``_foreach_lerp_`` over the model's own tensors (the least polyak's default update does)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..goals import FLOOR, Goal
from ..harness import DECAY, Contender, Step, averaged_elements

__all__ = ["BARE", "CONTENDERS", "GOALS", "flat_pair"]

BARE = "bare _foreach_lerp_ over the same tensors"


def flat_pair(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Two contiguous float32 buffers with as many elements as the model averages."""
    numel = averaged_elements(model)
    device = next(model.parameters()).device
    return torch.zeros(numel, device=device), torch.ones(numel, device=device)


def _floor(model: nn.Module) -> Step:
    average, target = flat_pair(model)

    def step() -> None:
        average.lerp_(target, 1 - DECAY)

    return step


def _copy(model: nn.Module) -> Step:
    destination, source = flat_pair(model)

    def step() -> None:
        destination.copy_(source)

    return step


def _tensors(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The model's distinct state tensors, detached: the floating ones (averaged) and the others (copied)."""
    unique = {id(t): t.detach() for t in model.state_dict(keep_vars=True).values()}.values()
    return [t for t in unique if t.is_floating_point()], [t for t in unique if not t.is_floating_point()]


def _bare_foreach(model: nn.Module) -> Step:
    """What polyak's default update does at the least: one ``_foreach_lerp_`` over the averaged tensors (and one
    ``_foreach_copy_`` of the integer buffers), with no Python around it."""
    floats, others = _tensors(model)
    averages, copies = [t.clone() for t in floats], [t.clone() for t in others]

    def step() -> None:
        torch._foreach_lerp_(averages, floats, 1 - DECAY)
        if copies:
            torch._foreach_copy_(copies, others)

    return step


CONTENDERS = [
    Contender(FLOOR, _floor),
    Contender("copy_ of the same buffer (bandwidth reference)", _copy, moved_bytes=8),
    Contender(BARE, _bare_foreach),
]
GOALS: list[Goal] = []
