"""Trainer integrations: a Lightning callback and a Hugging Face Trainer callback.

Each lives in its own module and imports its framework only when imported itself::

    from polyak.integrations.lightning import AveragingCallback      # pip install polyak[lightning]
    from polyak.integrations.transformers import AveragingCallback   # pip install polyak[transformers]

Both take the averager the same way: a factory ``model -> averager`` (default :func:`default_averager`), so
every polyak averager works in both, e.g. ``AveragingCallback(lambda m: polyak.SWA(m, start_step=500))``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import nullcontext
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ..distributed import full_model_state_dict
from ..ema import EMA
from ..rules import RationalWarmup
from ..storage.dtensor import is_dtensor
from ..swap import exporting_average

__all__ = ["AveragerFactory", "averaged_full_state", "build_averager", "default_averager"]

AveragerFactory = Callable[[nn.Module], Any]
"""Builds the averager for a model: any object with ``update``, ``swapped``, ``copy_to``, ``state_dict``,
``load_state_dict`` and ``num_updates`` (every polyak averager)."""

_INTERFACE = ("update", "swapped", "copy_to", "state_dict", "load_state_dict", "num_updates")


def default_averager(model: nn.Module) -> EMA:
    """An EMA with decay 0.999 per optimizer step (a horizon of ~1000 steps), warmed up as ``(1 + n) / (10 + n)``.

    The warm-up keeps short runs meaningful: early updates weigh the fresh iterates instead of the initial weights.
    """
    return EMA(model, rule=RationalWarmup(0.999))


def build_averager(factory: AveragerFactory, model: nn.Module) -> Any:
    """Call ``factory(model)`` and check that the result has the averager interface the callbacks use."""
    averager = factory(model)
    missing = [name for name in _INTERFACE if not hasattr(averager, name)]
    if missing:
        raise TypeError(
            f"the averager factory returned a {type(averager).__name__}, which lacks {missing}; "
            "pass a function model -> polyak averager, e.g. lambda model: polyak.EMA(model, decay=0.999)"
        )
    return averager


def check_factory(factory: AveragerFactory | None) -> AveragerFactory:
    """``factory`` or the default; a clear error for an averager instance passed where a factory belongs."""
    if factory is None:
        return default_averager
    is_instance = not isinstance(factory, type) and hasattr(factory, "swapped")  # a class (polyak.SWA) is fine
    if isinstance(factory, nn.Module) or is_instance or not callable(factory):
        raise TypeError(
            f"averager must be a function model -> averager (or None for the default), got {type(factory).__name__}; "
            "e.g. AveragingCallback(lambda model: polyak.EMA(model, decay=0.999))"
        )
    return factory


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"polyak.integrations.{extra} needs the `{module}` package, which is not installed; "
            f"install it with `pip install polyak[{extra}]`"
        ) from error


def check_suffix(suffix: Any) -> str:
    """A metric-name suffix for the averaged metrics: a non-empty string."""
    if not isinstance(suffix, str) or not suffix:
        raise ValueError(f"metric_suffix must be a non-empty string such as '_ema', got {suffix!r}")
    return suffix


def averaged_full_state(averager: Any, model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict holding the averaged weights, gathered in full on rank 0 (``{}`` on other ranks).

    A collective when the model is sharded (FSDP2): every rank must call it. The tensors are copies: the model
    holds its training weights again when this returns. The averager must hold at least one update; ``None``
    exports the model's own weights (e.g. after ``copy_to``).
    """
    swap = averager.swapped(model) if averager is not None else nullcontext()
    with exporting_average(), swap:  # the swap is deliberate here: what is exported is the average
        gathered = full_model_state_dict(model)  # DTensors and ZeRO-3 partitions gathered, one at a time
        tensors = (*model.parameters(), *model.buffers())
        live = {t.untyped_storage().data_ptr() for t in tensors if t.numel() and not is_dtensor(t)}
        # What was not gathered is the model's own memory, which holds the training weights again on return.
        return {
            name: value.clone() if value.numel() and value.untyped_storage().data_ptr() in live else value
            for name, value in gathered.items()
        }
