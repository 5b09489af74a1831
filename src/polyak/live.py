"""A live averaged module: a target network or momentum teacher whose own tensors are the average's storage.

The front ends build it here and then keep a :class:`~polyak.shadow.Shadow` with ``adopt=True`` over it, so an
update writes the average straight into the module's parameters and buffers (there is no second copy and no
second update path). The module does not require grad, keeps its own train/eval mode, and its
``state_dict()`` has the model's keys.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .module_tensors import copy_module, unwrap, walk
from .shadow import Shadow

__all__ = ["Target", "adopt", "check_same_structure", "make_target"]

Target = nn.Module | Literal["copy"]


def check_same_structure(model: nn.Module, target: nn.Module) -> None:
    """Raise ``ValueError`` naming the first tensor in which ``target`` differs from ``model``.

    Compared by qualified name, kind (parameter or buffer), shape and dtype, through DDP / compile wrappers.
    """
    mine = {f.name: f for f in walk(model)[0]}
    theirs = {f.name: f for f in walk(target)[0]}
    missing = [name for name in mine if name not in theirs]
    extra = [name for name in theirs if name not in mine]
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model has not"
        raise ValueError(
            f"target {type(unwrap(target)).__name__} {which} ({len(missing)} missing, {len(extra)} extra tensors); "
            'pass a module built like the online model, or target="copy"'
        )
    for name, f in mine.items():
        other = theirs[name].tensor
        if f.is_param != theirs[name].is_param:
            kinds = ("parameter", "buffer")
            raise ValueError(
                f"target tensor {name!r} is a {kinds[not theirs[name].is_param]}, in the online model a "
                f"{kinds[not f.is_param]}; pass a module built like the online model"
            )
        if other.shape != f.tensor.shape or other.dtype != f.tensor.dtype:
            raise ValueError(
                f"target tensor {name!r} has shape {tuple(other.shape)} and dtype {other.dtype}, the online model "
                f"{tuple(f.tensor.shape)} and {f.tensor.dtype}; build the target like the model (same dtype), "
                'or use target="copy"'
            )


def make_target(
    model: nn.Module, target: Any, *, dtype: torch.dtype | None, device: torch.device | str | None
) -> nn.Module:
    """The live module for ``target``: a deep copy of ``model`` (``"copy"``, moved to ``device`` and cast to
    ``dtype`` if given) or the user's own module, checked against ``model``."""
    if isinstance(target, str):
        if target != "copy":
            raise ValueError(f'target must be "copy" or an nn.Module built like the model, got {target!r}')
        module = copy_module(model)
        if device is not None:
            module.to(device=device)
        if dtype is not None:  # floating tensors only; complex ones keep their imaginary part
            wanted = {True: dtype.to_complex(), False: dtype}
            module._apply(lambda t: t.to(wanted[t.is_complex()]) if t.is_floating_point() or t.is_complex() else t)
        return module
    if not isinstance(target, nn.Module):
        raise TypeError(f'target must be "copy" or an nn.Module built like the model, got {type(target).__name__}')
    if dtype is not None or device is not None:
        raise ValueError(
            "target=<module> is averaged in its own dtype and on its own device: leave dtype and device as None "
            '(or use target="copy", dtype=..., device=...)'
        )
    if unwrap(target) is unwrap(model):
        raise ValueError("target is the online model itself; pass a separate module of the same structure")
    check_same_structure(model, target)
    return target


def adopt(model: nn.Module, target: nn.Module, *, copy: bool = True, **options: Any) -> Shadow:
    """A shadow stored in ``target``'s own tensors, selected as in ``model``, holding ``model``'s values
    (``copy=False``: keeping the target's).

    Which parameters are averaged follows ``model`` (``requires_grad``), not the target; afterwards no
    parameter of the target requires grad.
    """
    online = {f.name: f.tensor for f in walk(model)[0]}
    for f in walk(target)[0]:
        if f.is_param and f.name in online:
            f.tensor.requires_grad_(online[f.name].requires_grad)
    shadow = Shadow(target, adopt=True, **options)
    unwrap(target).requires_grad_(False)
    if copy:
        shadow.copy_from(model)
    return shadow


def first_tensor(module: nn.Module) -> torch.Tensor | None:
    """The module's first parameter or buffer: converting the module (``.to()``, ``.half()``) gives it new memory."""
    found = walk(module)[0]
    return found[0].tensor if found else None
