"""One training run per (setting, seed): every average tracked alongside by polyak, evaluated on the test set
during training; BatchNorm statistics recomputed for some; the post-hoc EMA width chosen at the end."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import polyak
from polyak.bn import norm_layers

from .data import Dataset, with_label_noise
from .recipe import (
    BATCH_SIZE,
    LAST,
    LEARNING_RATE,
    METHODS,
    MODELS,
    RECALCULATED,
    SNAPSHOT_SIGMA_RELS,
    Setting,
    Tracker,
)
from .selection import Sweep, sweep

BN_BATCH = 500  # training sequences per batch when update_bn recomputes the BatchNorm statistics


@dataclass(frozen=True)
class Curves:
    """Test accuracy (%) over one run, for the last iterate and each average (NaN before an average starts),
    and the post-hoc sweep at the end (settings with ``posthoc`` only)."""

    steps: list[int]
    accuracy: dict[str, list[float]]
    sweep: Sweep | None = None


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of ``x`` classified as ``y``, in percent."""
    return 100.0 * (model(x).argmax(dim=1) == y).double().mean().item()


def _batches(size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of shuffled mini-batches of BATCH_SIZE, epoch after epoch (the last partial batch dropped)."""
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


def train(
    data: Dataset, setting: Setting, seed: int, steps: int, evaluations: int, advance: Callable[[int], None]
) -> Curves:
    """Train for ``steps`` SGD steps, evaluating every average ``evaluations`` times, evenly spaced.

    ``seed`` fixes the initial weights, the batch order and the noisy labels. ``advance(n)`` is told each
    time ``n`` more steps are done (for a progress bar).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[setting.model](data.x.shape[1], data.classes)
    generator = torch.Generator().manual_seed(seed)
    labels = with_label_noise(data.y, setting.label_noise, data.classes, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if setting.decay_lr else None
    trackers: dict[str, Tracker] = {method.name: method.make(model, steps) for method in METHODS}
    for tracker in trackers.values():
        tracker.attach(optimizer)  # one training loop; every average follows the same optimizer steps
    recalculated = {m.name for m in METHODS if m.recalculate} if norm_layers(model) else set()
    posthoc = polyak.PostHocEMA(model, SNAPSHOT_SIGMA_RELS) if setting.posthoc else None
    if posthoc is not None:
        posthoc.attach(optimizer)

    checkpoints = sorted({max(1, round(k * steps / evaluations)) for k in range(1, evaluations + 1)})
    due = set(checkpoints)
    names = [LAST, *trackers, *(name + RECALCULATED for name in trackers if name in recalculated)]
    curves = Curves(checkpoints, {name: [] for name in names})
    batches = _batches(len(labels), generator)
    done = 0
    with tempfile.TemporaryDirectory(prefix="polyak-demo-") as scratch:
        snapshots = Path(scratch) / "snapshots"
        for step in range(1, steps + 1):
            index = next(batches)
            loss = nn.functional.cross_entropy(model(data.x[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if step in due:
                _evaluate(model, trackers, recalculated, data, curves.accuracy)
                if posthoc is not None:
                    posthoc.snapshot(snapshots)
                advance(step - done)
                done = step
        if posthoc is None:
            return curves
        return Curves(curves.steps, curves.accuracy, sweep(model, snapshots, data, accuracy))


def _evaluate(
    model: nn.Module,
    trackers: dict[str, Tracker],
    recalculated: set[str],
    data: Dataset,
    into: dict[str, list[float]],
) -> None:
    """Append the test accuracy of the last iterate and of every average (after ``update_bn`` as well, for the
    averages in ``recalculated``) to ``into``; the model is left as it was, in train mode."""
    model.eval()
    into[LAST].append(accuracy(model, data.x_test, data.y_test))
    for name, tracker in trackers.items():
        rows = [name, name + RECALCULATED] if name in recalculated else [name]
        if tracker.num_updates == 0:
            for row in rows:
                into[row].append(float("nan"))
            continue
        with tracker.swapped(model):  # the model's own weights and statistics come back on exit
            into[name].append(accuracy(model, data.x_test, data.y_test))
            if name in recalculated:
                polyak.update_bn(data.x.split(BN_BATCH), model)
                into[name + RECALCULATED].append(accuracy(model, data.x_test, data.y_test))
    model.train()
