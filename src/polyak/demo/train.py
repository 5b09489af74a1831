"""One training run per (setting, seed): an MLP on MNIST-1D, every average tracked alongside by polyak."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

import polyak
from polyak.rules import PowerFunction

from .data import Dataset, with_label_noise

LEARNING_RATE = 0.5  # plain SGD, no momentum: high enough that the last iterate keeps jumping around
BATCH_SIZE = 16
WIDTH = 100  # hidden units in each of the MLP's two hidden layers
LAST = "last iterate"


class Tracker(Protocol):
    """What the demo needs from an averager: polyak's front ends (EMA, SWA, ...) all provide it."""

    num_updates: int

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> RemovableHandle: ...

    def swapped(self, model: nn.Module | None = None) -> AbstractContextManager[nn.Module]: ...


@dataclass(frozen=True)
class Method:
    """A row of the table: a name and how to build its averager from the model and the run's length in steps."""

    name: str
    make: Callable[[nn.Module, int], Tracker]


# One line per row. Any front end with ``attach``, ``swapped`` and ``num_updates`` fits as is (e.g. BEMA).
METHODS: tuple[Method, ...] = (
    Method("EMA 0.99", lambda model, steps: polyak.EMA(model, decay=0.99)),
    Method("EMA 0.999", lambda model, steps: polyak.EMA(model, decay=0.999)),
    Method("SWA (last 25%)", lambda model, steps: polyak.SWA(model, start_step=steps - steps // 4)),
    Method("power EMA σrel 0.05", lambda model, steps: polyak.EMA(model, rule=PowerFunction(sigma_rel=0.05))),
    Method("power EMA σrel 0.10", lambda model, steps: polyak.EMA(model, rule=PowerFunction(sigma_rel=0.10))),
)


@dataclass(frozen=True)
class Setting:
    """A column of the table: how the learning rate evolves and how many training labels are wrong."""

    name: str
    decay_lr: bool = False  # cosine decay from LEARNING_RATE to 0 over the run, else constant
    label_noise: float = 0.0  # fraction of training labels replaced by a random class


SETTINGS: tuple[Setting, ...] = (
    Setting("constant LR"),
    Setting("decaying LR", decay_lr=True),
    Setting("constant LR, 30% noisy labels", label_noise=0.3),
)


@dataclass(frozen=True)
class Curves:
    """Test accuracy (%) over one run, for the last iterate and each average (NaN before an average starts)."""

    steps: list[int]
    accuracy: dict[str, list[float]]


def mlp(inputs: int, classes: int) -> nn.Sequential:
    """Two hidden ReLU layers of WIDTH units (no BatchNorm, so the averages need no statistics recomputed)."""
    return nn.Sequential(
        nn.Linear(inputs, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, classes)
    )


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
        model = mlp(data.x.shape[1], data.classes)
    generator = torch.Generator().manual_seed(seed)
    labels = with_label_noise(data.y, setting.label_noise, data.classes, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if setting.decay_lr else None
    trackers = {method.name: method.make(model, steps) for method in METHODS}
    for tracker in trackers.values():
        tracker.attach(optimizer)  # one training loop; every average follows the same optimizer steps

    checkpoints = sorted({max(1, round(k * steps / evaluations)) for k in range(1, evaluations + 1)})
    due = set(checkpoints)
    curves = Curves(checkpoints, {name: [] for name in (LAST, *trackers)})
    batches = _batches(len(labels), generator)
    done = 0
    for step in range(1, steps + 1):
        index = next(batches)
        loss = nn.functional.cross_entropy(model(data.x[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if step in due:
            model.eval()
            curves.accuracy[LAST].append(accuracy(model, data.x_test, data.y_test))
            for name, tracker in trackers.items():
                if tracker.num_updates == 0:
                    curves.accuracy[name].append(float("nan"))
                    continue
                with tracker.swapped(model):
                    curves.accuracy[name].append(accuracy(model, data.x_test, data.y_test))
            model.train()
            advance(step - done)
            done = step
    return curves
