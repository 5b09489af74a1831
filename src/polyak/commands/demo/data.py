"""MNIST-1D, generated locally by the ``mnist1d`` package (nothing is downloaded)."""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

HELD_OUT = 500  # training sequences set aside (the last ones) to choose the EMA length on, never trained on


@dataclass(frozen=True)
class Dataset:
    """Inputs (float32, one row per example) and integer class labels: train, held-out and test splits."""

    x: Tensor
    y: Tensor
    x_held_out: Tensor
    y_held_out: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str  # one line naming the dataset and how it was made

    @property
    def classes(self) -> int:
        return int(self.y.max().item()) + 1


def mnist1d() -> Dataset:
    """The standard MNIST-1D split (4,000 train / 1,000 test sequences of length 40, 10 classes), of which the
    last HELD_OUT training sequences are held out (for choices made after training, such as the EMA length).

    Built with ``mnist1d.data.make_dataset`` and its default arguments (generator seed 42), which takes
    about two seconds; the global ``random`` / ``numpy`` generator states it reseeds are restored.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    saved = random.getstate(), np.random.get_state()
    try:
        args = get_dataset_args()
        raw = make_dataset(args)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    x, y = torch.tensor(raw["x"], dtype=torch.float32), torch.tensor(raw["y"], dtype=torch.int64)
    x_test, y_test = torch.tensor(raw["x_test"], dtype=torch.float32), torch.tensor(raw["y_test"], dtype=torch.int64)
    version = importlib.metadata.version("mnist1d")
    kept = len(y) - HELD_OUT
    source = (
        f"MNIST-1D (Greydanus & Kobak), generated locally by mnist1d {version} make_dataset (seed {args.seed}): "
        f"{kept:,} train + {HELD_OUT:,} held out / {len(y_test):,} test sequences of length {x.shape[1]}"
    )
    return Dataset(x[:kept], y[:kept], x[kept:], y[kept:], x_test, y_test, source)


def with_label_noise(labels: Tensor, fraction: float, classes: int, generator: torch.Generator) -> Tensor:
    """A copy of ``labels`` in which ``round(fraction * len(labels))`` of them, chosen at random, are
    replaced by a uniformly random class (which may be the true one)."""
    noisy = labels.clone()
    chosen = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    noisy[chosen] = torch.randint(classes, (len(chosen),), generator=generator)
    return noisy
