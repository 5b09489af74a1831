"""Post-hoc EMA in the demo: after training, the width chosen on the held-out split by ``polyak.posthoc.select``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from polyak.posthoc import Selection, select

from .data import Dataset
from .recipe import SNAPSHOT_SIGMA_RELS, SWEEP_SIGMA_RELS

FILE = "selection.png"  # the selection plot of the first run that keeps snapshots
Accuracy = Callable[[nn.Module, Tensor, Tensor], float]  # (model, x, y) -> accuracy in percent


@dataclass(frozen=True)
class Sweep:
    """Post-hoc EMA after training: accuracy (%) of the average reconstructed for each relative width that the
    snapshots express (of SWEEP_SIGMA_RELS), and the width ``select`` chose on the held-out split."""

    sigma_rels: list[float]
    test: list[float]
    held_out: list[float]  # on the training sequences held out from training: the scores select compared
    profile_errors: list[float]  # relative L2 error of each reconstructed weight profile (0 = exact)
    snapshots: int  # how many snapshots the reconstruction combined
    saved_sigma_rels: list[float]  # the widths each snapshot holds
    chosen: float  # the width with the best held-out accuracy (the smallest among equals)
    selection: Selection | None = None  # what select returned, without the chosen weights (for the plot)


def sweep(model: nn.Module, snapshots: Path, data: Dataset, accuracy: Accuracy) -> Sweep:
    """Score every width of SWEEP_SIGMA_RELS the snapshots express by its held-out ``accuracy`` with ``select``
    (which restores ``model``), recording its test accuracy beside it for the table; the test set plays no part
    in the choice."""
    test: list[float] = []

    def held_out_accuracy(candidate: nn.Module) -> float:
        candidate.eval()
        test.append(accuracy(candidate, data.x_test, data.y_test))  # select scores the widths in the order given
        return accuracy(candidate, data.x_held_out, data.y_held_out)

    result = select(snapshots, model, held_out_accuracy, sigma_rels=SWEEP_SIGMA_RELS, mode="max")
    widths = [float(w) for w in result.scores]
    used = sum(1 for path in snapshots.iterdir() if path.suffix == ".safetensors")
    return Sweep(
        widths, test, list(result.scores.values()), [result.fit_errors[w] for w in widths], used,
        list(SNAPSHOT_SIGMA_RELS), float(result.chosen), dataclasses.replace(result, state_dict={}),
    )  # fmt: skip


def plot(sweeps: Iterable[Sweep | None], out: Path) -> None:
    """The selection plot of the first of ``sweeps`` (the first run that kept snapshots), as ``out / FILE``."""
    first = next((found.selection for found in sweeps if found is not None and found.selection is not None), None)
    if first is not None:
        first.plot(out / FILE, score="held-out accuracy (%)")
