"""One half of a resume test, run in its own process: ``python resume_job.py first|second DIR SPLIT TOTAL``.

``first`` runs SPLIT steps of every case and saves each averager's state; ``second`` builds everything anew
(from other random weights), loads those states with ``polyak.load_state`` and runs the remaining steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import polyak
from polyak import rules, swa_utils


def model_for(case: str) -> nn.Module:
    """float32 and bf16 layers, BatchNorm (floating and integer buffers), a frozen layer."""
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(3, 2))
    model[3].requires_grad_(False)
    return model


class TorchStyle:
    """A ``swa_utils.AveragedModel`` driven like an averager: ``update()``, ``state_dict()``, ``load_state_dict()``."""

    def __init__(self, averaged: swa_utils.AveragedModel, model: nn.Module) -> None:
        self.averaged, self.model = averaged, model

    def update(self) -> None:
        self.averaged.update_parameters(self.model)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


CASES: dict[str, Any] = {
    "ema-decay": lambda m: polyak.EMA(m, decay=0.9),
    "ema-half-life-every-3-start-2": lambda m: polyak.EMA(m, half_life=4.0, update_every=3, start_step=2),
    "ema-debiased": lambda m: polyak.EMA(m, rule=rules.DebiasedDecay(0.95)),
    "ema-rational-warmup": lambda m: polyak.EMA(m, rule=rules.RationalWarmup(0.99)),
    "ema-power-warmup-every-2": lambda m: polyak.EMA(m, rule=rules.PowerWarmup(0.999), update_every=2),
    "ema-power-function": lambda m: polyak.EMA(m, rule=rules.PowerFunction(sigma_rel=0.1)),
    "ema-float64-frozen-averaged": lambda m: polyak.EMA(m, decay=0.8, dtype=torch.float64, frozen="average"),
    "ema-skip-nonfinite": lambda m: polyak.EMA(m, decay=0.7, nonfinite="skip"),
    "swa-every-2-start-3": lambda m: polyak.SWA(m, update_every=2, start_step=3),
    "swa_utils-averaged-model-float32": lambda m: TorchStyle(swa_utils.AveragedModel(m, dtype=torch.float32), m),
    "swa_utils-ema-multi-buffers": lambda m: TorchStyle(
        swa_utils.AveragedModel(m, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True), m
    ),
    "swa_utils-exponential-moving-average": lambda m: TorchStyle(swa_utils.ExponentialMovingAverage(m, 0.8), m),
}
POISONED = {4, 13}  # steps at which "ema-skip-nonfinite" sees a NaN (one before the split, one after)


def set_model(model: nn.Module, step: int, case: str) -> None:
    """The model's tensors at ``step``: a function of the step alone, so every process sees the same run."""
    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
            else:
                tensor.fill_(step)
        if case == "ema-skip-nonfinite" and step in POISONED:
            model[0].weight[1, 2] = float("nan")


def run(case: str, averager: polyak.Averager | TorchStyle, model: nn.Module, steps: range) -> None:
    for step in steps:
        set_model(model, step, case)
        averager.update()


def main(phase: str, folder: Path, split: int, total: int) -> None:
    for case, make in CASES.items():
        torch.manual_seed(0 if phase == "first" else 1)
        model = model_for(case)
        averager = make(model)
        if phase == "first":
            run(case, averager, model, range(split))
            torch.save(averager.state_dict(), folder / f"{case}.pt")
        else:
            path = folder / f"{case}.pt"
            state = (
                polyak.load_state(path)
                if isinstance(averager, polyak.Averager)
                else torch.load(path, weights_only=True)
            )
            averager.load_state_dict(state)
            run(case, averager, model, range(split, total))
            torch.save(averager.state_dict(), folder / f"{case}.final.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
