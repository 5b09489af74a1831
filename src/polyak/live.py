"""A live averaged module: a target network or momentum teacher that holds the average and runs forward.

The front ends build it here (a copy of the model, or the user's module, checked) and hand it to their
:class:`~polyak.shadow.Shadow` as its ``target``: where the module's own tensors have the average's storage dtype
(a float32 model, or ``dtype=`` the model's), they are the storage, and an update writes straight into them;
otherwise (a bf16 model's float32 master, a stochastically rounded one) the average is kept apart and copied
into the module after every update, at the cost of that master's memory. The module does not require grad,
keeps its own train/eval mode, and its ``state_dict()`` has the model's keys.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .module_tensors import copy_module, shared_memory, unwrap, walk

__all__ = ["Target", "check_same_structure", "make_target"]

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


def _refuse_aliasing(model: nn.Module, target: nn.Module) -> None:
    """Raise ``ValueError`` naming the tensor when ``target`` shares memory with ``model`` (a module reused by
    reference, tied weights, a view or slice): every update would write the average into the online model's own
    tensor."""
    shared = shared_memory(((f.name, f.tensor) for f in walk(target)[0]), ((f.name, f.tensor) for f in walk(model)[0]))
    if shared is not None:
        raise ValueError(
            f"target tensor {shared[0]!r} shares its memory with the online model's {shared[1]!r} (a module or "
            "weight reused by reference); the average would overwrite the model. Pass a separate module, e.g. "
            'copy.deepcopy(model), or target="copy"'
        )


def make_target(model: nn.Module, target: Any) -> nn.Module:
    """The live module for ``target``: a deep copy of ``model`` (``"copy"``) or the user's own module, checked
    against ``model`` (structure, and no memory shared with it). Its parameters stop requiring grad."""
    if isinstance(target, str):
        if target != "copy":
            raise ValueError(f'target must be "copy" or an nn.Module built like the model, got {target!r}')
        module = copy_module(model)
    elif isinstance(target, nn.Module):
        if unwrap(target) is unwrap(model):
            raise ValueError("target is the online model itself; pass a separate module of the same structure")
        check_same_structure(model, target)
        _refuse_aliasing(model, target)
        module = target
    else:
        raise TypeError(f'target must be "copy" or an nn.Module built like the model, got {type(target).__name__}')
    unwrap(module).requires_grad_(False)
    return module
