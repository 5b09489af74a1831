"""What the demo trains and tracks: the two models, the averages (rows) and the settings (columns).

Reading this table imports no torch (``polyak demo --help`` shows some of it); the models are built with it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import polyak
from polyak.rules import PowerFunction, RationalWarmup

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

LEARNING_RATE = 0.5  # plain SGD, no momentum: high enough that the last iterate keeps jumping around
BATCH_SIZE = 16
WIDTH = 100  # hidden units in each of the MLP's two hidden layers
CHANNELS = 16  # channels in each of the CNN's two convolutions
LAST = "last iterate"
RECALCULATED = " + update_bn"  # suffix of a row whose BatchNorm statistics were recomputed on the training data
POSTHOC = "post-hoc EMA, σrel chosen on held-out"

# Post-hoc EMA: two widths saved as snapshots at every evaluation, others reconstructed after training. The
# saved widths differ from the directly tracked power EMAs (0.05, 0.10), so their reconstruction is a real test.
SNAPSHOT_SIGMA_RELS = (0.03, 0.15)
SWEEP_SIGMA_RELS = (0.02, 0.035, 0.05, 0.07, 0.10, 0.14, 0.19, 0.25)


class Tracker(Protocol):
    """What the demo needs from an averager: polyak's front ends (EMA, SWA, BEMA, ...) all provide it."""

    num_updates: int

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> RemovableHandle: ...

    def swapped(self, model: nn.Module | None = None) -> AbstractContextManager[nn.Module]: ...


@dataclass(frozen=True)
class Method:
    """A row of the table: a name and how to build its averager from the model and the run's length in steps.

    ``recalculate``: in a model with BatchNorm, also evaluate this average after ``polyak.update_bn``.
    """

    name: str
    make: Callable[[nn.Module, int], Tracker]
    recalculate: bool = False
    warmup: RationalWarmup | None = None  # an EMA's rule: the notes say what decay it reaches in the run


def _ema(decay: float, recalculate: bool = False) -> Method:
    """EMA ``decay``, warmed up as polyak's integrations do (RationalWarmup: decay min(d, (1 + n) / (10 + n))
    after n updates), so that it follows the weights from the start instead of sitting near the initial ones."""
    rule = RationalWarmup(decay)
    return Method(f"EMA {decay:g}", lambda model, steps: polyak.EMA(model, rule=rule), recalculate, rule)


# One line per row. Any front end with ``attach``, ``swapped`` and ``num_updates`` fits as is.
METHODS: tuple[Method, ...] = (
    _ema(0.99),
    _ema(0.999, recalculate=True),
    Method("SWA (last 25%)", lambda model, steps: polyak.SWA(model, start_step=steps - steps // 4), recalculate=True),
    Method("power EMA σrel 0.05", lambda model, steps: polyak.EMA(model, rule=PowerFunction(sigma_rel=0.05))),
    Method("power EMA σrel 0.10", lambda model, steps: polyak.EMA(model, rule=PowerFunction(sigma_rel=0.10))),
    Method("BEMA", lambda model, steps: polyak.BEMA(model)),
)
DIRECT_SIGMA_RELS = {0.05: "power EMA σrel 0.05", 0.10: "power EMA σrel 0.10"}  # width -> its directly tracked row


@dataclass(frozen=True)
class Setting:
    """A column of the table: the model, how the learning rate evolves, how many training labels are wrong,
    and whether post-hoc EMA snapshots are kept and swept."""

    name: str
    model: Literal["mlp", "cnn"] = "mlp"
    decay_lr: bool = False  # cosine decay from LEARNING_RATE to 0 over the run, else constant
    label_noise: float = 0.0  # fraction of training labels replaced by a random class
    posthoc: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("constant LR", posthoc=True),
    Setting("decaying LR", decay_lr=True),
    Setting("constant LR, 30% noisy labels", label_noise=0.3),
    Setting("CNN + BatchNorm, constant LR", model="cnn"),
)


def mlp(inputs: int, classes: int) -> nn.Sequential:
    """Two hidden ReLU layers of WIDTH units, no normalisation layer."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(inputs, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, classes)
    )


def cnn(inputs: int, classes: int) -> nn.Sequential:
    """Two convolutions (kernel 5, stride 2, CHANNELS channels), each followed by BatchNorm and ReLU, then a
    linear layer on the ``ceil(inputs / 4)`` positions left."""
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, inputs)),
        nn.Conv1d(1, CHANNELS, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm1d(CHANNELS),
        nn.ReLU(),
        nn.Conv1d(CHANNELS, CHANNELS, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm1d(CHANNELS),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(CHANNELS * -(-inputs // 4), classes),
    )


MODELS: dict[str, Callable[[int, int], nn.Module]] = {"mlp": mlp, "cnn": cnn}
