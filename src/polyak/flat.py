"""Flat parameters: a model's tensors laid out in one contiguous buffer per (device, dtype).

With the model flat, a :class:`~polyak.shadow.Shadow` updates each group with a single kernel over the two
buffers instead of one launch per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .module_tensors import unwrap

__all__ = ["flatten_parameters"]


@torch.no_grad()
def flatten_parameters(model: nn.Module, *, buffers: bool = True) -> dict[tuple[torch.device, torch.dtype], Tensor]:
    """Move ``model``'s parameters (and buffers) into one contiguous buffer per (device, dtype), in place.

    Each tensor keeps its object (``p.data`` is replaced by a view into the buffer, values unchanged), in the
    module order a :class:`~polyak.shadow.Shadow` uses, so the average of a flat model is one kernel per
    group. Call it before building the optimizer and before ``torch.compile``. Tensors become contiguous
    (e.g. channels-last weights are laid out row-major). Moving the model later (``model.to(...)``) breaks
    the layout; averaging stays correct, just no longer single-kernel.

    Args:
        model: the model; wrappers (DDP, ``torch.compile``) are looked through.
        buffers: also lay out the buffers (BatchNorm statistics), each dtype in its own buffer.

    Returns:
        The buffers by (device, dtype); their elements are the model's, so keep them only as long as needed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors: list[Tensor] = []
    seen: set[int] = set()
    for prefix, module in unwrap(model).named_modules():
        owners = (module._parameters, module._buffers) if buffers else (module._parameters,)
        for owner in owners:
            for key, tensor in owner.items():
                if tensor is None or id(tensor) in seen:
                    continue
                if type(tensor) not in (Tensor, nn.Parameter):
                    raise TypeError(
                        f"cannot flatten {prefix + '.' if prefix else ''}{key}: it is a {type(tensor).__name__}, "
                        "which manages its own storage (DTensor, lazy and other tensor subclasses); "
                        "use the model as it is"
                    )
                seen.add(id(tensor))
                tensors.append(tensor)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flats: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(t.numel() for t in members), dtype=dtype, device=device)
        offset = 0
        for tensor in members:
            n = tensor.numel()
            view = flat[offset : offset + n].view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
            offset += n
        flats[(device, dtype)] = flat
    return flats
