"""Recalculating the running statistics of normalisation layers after their weights were averaged.

An averaged model's activations match none of the averaged iterates, so its BatchNorm statistics must be
re-estimated from data: :func:`update_bn` runs one pass over a loader and sets each layer's running mean and
variance to the average, over the batches, of the batch statistics (``torch.optim.swa_utils.update_bn``'s
definition: each forward call of a layer weighs the same, whatever its batch size).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import is_lazy

from .checks import check_flag, check_int

__all__ = ["norm_layers", "update_bn"]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose running statistics :func:`update_bn` recomputes.

    Every BatchNorm (1d/2d/3d, lazy, ``SyncBatchNorm``) and InstanceNorm that has ``track_running_stats=True``.
    """
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats]


def _to(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor inside (lists, tuples, dicts) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(value, device) for value in batch)
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a list or tuple gives its first element; a dict gives keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: int | str | torch.device | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    weighting: Literal["batch", "sample"] = "batch",
    sync_ranks: bool | None = None,
) -> None:
    """Recompute the running mean and variance of ``model``'s normalisation layers with one pass over ``loader``.

    Same result as ``torch.optim.swa_utils.update_bn`` (statistics reset, then the cumulative average of the
    per-batch statistics, as with ``momentum=None``; each layer's ``momentum`` restored afterwards), and:

    * only the normalisation layers run in train mode; dropout and any other train-time behaviour stay off
      (torch puts the whole model in train mode). Every module's own mode is restored afterwards;
    * InstanceNorm layers with ``track_running_stats=True`` are recomputed too (torch skips them), and lazy
      BatchNorm layers not yet initialised are initialised by the pass (torch raises);
    * the update needs no host synchronisation per batch.

    Args:
        loader: any iterable of batches: a tensor, a list or tuple (its first element is the input), or a dict
            (passed as keyword arguments); or anything ``forward`` understands.
        model: the model, e.g. an :class:`~polyak.swa_utils.AveragedModel`.
        device: if given, every tensor of each batch is moved there first.
        forward: ``forward(model, batch)`` runs the model on a batch, for any other batch structure.
        max_batches: stop after this many batches (default: the whole loader).
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        progress: show a progress bar (needs ``tqdm``).
        weighting: ``"batch"`` (default, as torch): each call of a layer weighs the same. ``"sample"``: each call
            weighs its batch size (the first dimension of the layer's input), as the original SWA code's
            ``bn_update``, so the running mean is the mean over the whole dataset even when batch sizes differ.

        sync_ranks: under ``torch.distributed``, pool the recomputed statistics of all ranks at the end (two
            collectives, :func:`polyak.distributed.all_reduce_batchnorm_stats` weighted by each rank's batches,
            or samples with ``weighting="sample"``), so every rank ends with the statistics one process would
            compute over all ranks' batches. Default: on when a process group with more than one rank is
            initialised. Every rank must call ``update_bn`` then. ``SyncBatchNorm`` layers are already
            identical across ranks and stay so.

    A model without such layers warns and is left unchanged; an empty loader raises ``ValueError`` before
    anything changes. An error during the pass leaves the statistics partly updated, modes and momenta restored.
    """
    if weighting not in ("batch", "sample"):
        raise ValueError(f"weighting must be 'batch' or 'sample', got {weighting!r}")
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, low=1, hint="or None for the whole loader")
    check_flag("progress", progress)
    if sync_ranks is not None:
        check_flag("sync_ranks", sync_ranks)
    if not (autocast_dtype is None or (isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point)):
        raise TypeError(f"autocast_dtype must be a floating torch.dtype or None, got {autocast_dtype!r}")
    layers: list[Any] = norm_layers(model)
    if not layers:
        warnings.warn(
            f"update_bn: {type(model).__name__} has no BatchNorm (or InstanceNorm with track_running_stats) layer; "
            "nothing to recompute, the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return
    target = torch.device(device) if device is not None else None
    run = forward if forward is not None else _default_forward
    bar: Any = None
    if progress:  # advanced by hand after each batch, so that it ends at the count run (max_batches included)
        try:
            from tqdm.auto import tqdm
        except ImportError as error:
            raise ImportError("update_bn(progress=True) needs tqdm: pip install tqdm") from error
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = tqdm(total=total, desc="update_bn", unit="batch")

    device_type = target.type if target is not None else _device_type(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    seen: dict[nn.Module, int] = {}
    by_sample = weighting == "sample"

    def cumulative(module: Any, args: Any) -> None:
        # momentum w/W after a total weight W of calls: the running statistics are the weighted mean over calls.
        weight = args[0].shape[0] if by_sample else 1  # a Python int: no tensor is read
        seen[module] = seen.get(module, 0) + weight
        module.momentum = weight / seen[module] if weight else 0.0

    iterator = iter(loader)
    handles = [m.register_forward_pre_hook(cumulative) for m in layers]
    try:
        first = next(iterator, _EMPTY)
        if first is _EMPTY:
            raise ValueError("update_bn: the loader yielded no batch; the statistics were left unchanged")
        model.eval()
        for m in layers:
            if not is_lazy(m.running_mean):  # a lazy layer not yet initialised starts fresh on its first call
                m.reset_running_stats()
            m.train()
        count, batch = 0, first
        while batch is not _EMPTY:
            batch = _to(batch, target)
            with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext():
                run(model, batch)
            count += 1
            if bar is not None:
                bar.update(1)
            if max_batches is not None and count >= max_batches:
                break
            batch = next(iterator, _EMPTY)
        if _pool_across_ranks(sync_ranks):
            from .distributed import all_reduce_batchnorm_stats

            weight = count if not by_sample else max(seen.values(), default=count)
            all_reduce_batchnorm_stats(model, count=float(weight), between_ranks=False)
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
        if bar is not None:
            bar.close()


_EMPTY = object()


def _pool_across_ranks(sync_ranks: bool | None) -> bool:
    """Whether to pool statistics across ranks: as asked, or by default when several ranks are running."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if sync_ranks and not initialised:
        raise RuntimeError("update_bn(sync_ranks=True) needs an initialised torch.distributed process group")
    return initialised and torch.distributed.get_world_size() > 1 if sync_ranks is None else sync_ranks


def _device_type(model: nn.Module) -> str:
    """The device type of the model's first tensor, for autocast."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device.type
    return "cpu"
