"""The swap guard: a module holding swapped-in averaged weights refuses what would mistake them for its own.

While a ``swapped()`` block is open, its module refuses a second swap, and updates and copies from any average
(``RuntimeError``); its ``state_dict()`` is marked (:func:`is_swapped_state_dict`, kept by ``torch.save``) and
warns, unless taken inside :func:`exporting_average`, which says the average is what is wanted.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .module_tensors import unwrap

__all__ = ["exporting_average", "is_swapped_state_dict", "refuse_swapped", "swap_marked"]

_SWAPPED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules holding swapped-in averaged weights now
OPEN = [0]  # blocks open now, so that the common case (none) costs one comparison per update
_EXPORTS = [0]  # open `exporting_average()` blocks
_MARK = "polyak_swapped"


@contextmanager
def exporting_average() -> Iterator[None]:
    """Within the block, a swapped module's ``state_dict()`` is taken on purpose, to export the average: it is
    still marked (:func:`is_swapped_state_dict`) but does not warn. Use it to save a model or pipeline from
    inside ``averager.swapped(model)``, e.g. ``with ema.swapped(model), polyak.exporting_average():
    model.save_pretrained(path)``."""
    _EXPORTS[0] += 1
    try:
        yield
    finally:
        _EXPORTS[0] -= 1


def _mark(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    """State-dict hook while swapped: mark the module's metadata entry (kept by ``torch.save``) and warn."""
    local_metadata[_MARK] = True
    if _EXPORTS[0]:
        return
    warnings.warn(
        f"state_dict() of {type(module).__name__} taken inside a `swapped()` block holds the averaged weights, "
        "not the training weights; polyak.is_swapped_state_dict() tells such a state apart (wrap a deliberate "
        "export in polyak.exporting_average())",
        stacklevel=3,
    )


def is_swapped_state_dict(state: dict[str, Any]) -> bool:
    """True when ``state`` (a module's ``state_dict()``) was taken while averaged weights were swapped in."""
    metadata = getattr(state, "_metadata", None) or {}
    return any(isinstance(entry, dict) and entry.get(_MARK) is True for entry in metadata.values())


def refuse_swapped(module: nn.Module) -> None:
    """Raise ``RuntimeError`` when ``module`` holds weights swapped in by a ``swapped()`` block still open."""
    if OPEN[0] and unwrap(module) in _SWAPPED:
        raise RuntimeError(
            f"the {type(unwrap(module)).__name__} holds averaged weights swapped in by a `swapped()` block that "
            "is still open; leave that block before updating, copying or swapping again"
        )


@contextmanager
def swap_marked(module: nn.Module) -> Iterator[None]:
    """Mark ``module`` as holding swapped-in weights for the block (guard and state-dict mark)."""
    target = unwrap(module)
    _SWAPPED.add(target)
    OPEN[0] += 1
    hook = target.register_state_dict_post_hook(_mark)
    try:
        yield
    finally:
        hook.remove()
        _SWAPPED.discard(target)
        OPEN[0] -= 1
