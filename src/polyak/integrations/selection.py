"""The callbacks' ``select_on``: at the end of training, the EMA width chosen with the trainer's own evaluation.

Shared by the Lightning and the Hugging Face callbacks; each supplies ``evaluate`` (one pass of its trainer's
validation loop, the ranks agreeing on the score) and logs and exports the result its own way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor
from ..posthoc import PostHocEMA, Selection, find_snapshots, select

__all__ = ["check_mode", "check_selectable", "choose", "exported", "metric_name", "share_run"]


def share_run(averager: Any) -> None:
    """A PostHocEMA writing snapshots takes rank 0's run id on every process: all of a trainer's processes write
    the periodic snapshots into one folder, as one run. A collective (broadcast): call it on every process."""
    if isinstance(averager, PostHocEMA) and averager.directory is not None and torch.distributed.is_initialized():
        shared = [averager.run_id]
        torch.distributed.broadcast_object_list(shared, src=0)
        averager.run_id = shared[0]


def check_mode(mode: Any) -> str:
    """``mode``: "min" (a loss) or "max" (an accuracy)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (e.g. a loss) or 'max' (e.g. an accuracy), got {mode!r}")
    return str(mode)


def check_selectable(averager: Any) -> PostHocEMA:
    """The averager, if a width can be chosen from it: a PostHocEMA writing snapshots to a directory."""
    if not isinstance(averager, PostHocEMA) or averager.directory is None:
        raise TypeError(
            f"select_on chooses the EMA width from PostHocEMA snapshots, but the averager is a "
            f"{type(averager).__name__}{' without a directory' if isinstance(averager, PostHocEMA) else ''}; pass "
            "e.g. AveragingCallback(lambda m: polyak.PostHocEMA(m, directory='phema', snapshot_every=500), ...)"
        )
    return averager


def choose(
    averager: PostHocEMA,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    mode: str,
    writer: bool,
    barrier: Callable[[], None],
) -> Selection:
    """:func:`polyak.posthoc.select` over the averager's snapshots, ``evaluate`` scoring each width in ``model``.

    First the average as of the last update is snapshotted by the process that ``writer`` names, unless a
    snapshot of that step exists (``barrier`` before, as every rank writes the periodic snapshots, and after).
    Every process then reconstructs and evaluates the same candidates; ``evaluate`` must return the same score
    on every rank.
    """
    if any(is_dtensor(p) for p in model.parameters()):
        raise RuntimeError(
            "select_on cannot load candidate widths into a sharded (FSDP2) model; use DDP, or choose after "
            "training with polyak.posthoc.select on an unsharded copy"
        )
    directory = averager.directory
    assert directory is not None
    barrier()
    if writer and not (directory.is_dir() and averager.last_update_step in {s.step for s in find_snapshots(directory)}):
        averager.snapshot()
    barrier()
    return select(directory, model, evaluate, mode=mode)  # type: ignore[arg-type]


def metric_name(width: float) -> str:
    """The part of a metric's name that says which width it was measured for: ``sigma_rel_0.05``."""
    return f"sigma_rel_{width:g}"


def exported(model: nn.Module, selection: Selection) -> dict[str, Tensor]:
    """``model``'s state dict (its training weights) with the chosen average's tensors in place of its own."""
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    state.update(selection.state_dict)
    return state
