"""Momentum schedules (BYOL/DINO cosine, linear, a user's own Rule) against their formulas in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import polyak
from polyak import rules
from polyak.rules import CosineMomentum, LinearMomentum, Rule


@dataclass(frozen=True)
class StepDecay(Rule):
    """The README's example of a user's own schedule: 0.99, then 0.999 from step ``at`` on."""

    before: float = 0.99
    after: float = 0.999
    at: int = 5

    def decay_at(self, j: int) -> float:
        return self.before if j < self.at else self.after


def byol_momentum(k: int, base: float, total: int) -> float:
    """BYOL's tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, k counted from 0 (Grill et al. 2020)."""
    return 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2


def dino_schedule(base: float, final: float, total: int) -> list[float]:
    """DINO's cosine_scheduler without warm-up: final + (base - final)(1 + cos(pi i / n)) / 2, i = 0..n-1."""
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / total)) for i in range(total)]


def test_cosine_matches_byol_and_dino():
    rule = CosineMomentum(start=0.996, end=1.0, total_steps=100)
    for t in range(1, 101):
        assert rule.decay_at(t) == pytest.approx(byol_momentum(t - 1, 0.996, 100), rel=0, abs=1e-15)
    dino = dino_schedule(0.9, 0.99, 50)
    general = CosineMomentum(start=0.9, end=0.99, total_steps=50)
    for t in range(1, 51):
        assert general.decay_at(t) == pytest.approx(dino[t - 1], rel=0, abs=1e-15)
    assert rule.decay_at(101) == 1.0 and rule.decay_at(10_000) == 1.0  # after the schedule: end


def test_linear_formula():
    rule = LinearMomentum(start=0.9, end=0.99, total_steps=9)
    for t in range(1, 20):
        k = min(t - 1, 9)
        assert rule.decay_at(t) == pytest.approx(0.9 + 0.09 * k / 9, rel=0, abs=1e-15)


def test_schedule_errors():
    for bad in (
        dict(start=1.1),
        dict(end=-0.1),
        dict(total_steps=0),
        dict(total_steps=2.5),
        dict(total_steps=True),
        dict(start=float("nan")),
    ):
        for cls in (CosineMomentum, LinearMomentum):
            with pytest.raises((ValueError, TypeError), match=r"start|end|total_steps"):  # TypeError: not an int
                cls(**{"total_steps": 10, **bad})


SCHEDULES = [
    CosineMomentum(start=0.9, end=1.0, total_steps=30),
    LinearMomentum(start=0.8, end=0.99, total_steps=25),
    StepDecay(),
]


@pytest.mark.parametrize("rule", SCHEDULES, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("every", [1, 3, 4])
def test_target_follows_the_schedule_in_float64(rule, every):
    """The target after updates every k steps equals the per-step recursion e <- m_t e + (1 - m_t) theta_t with
    the model held constant between updates (time in steps is kept)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = polyak.EMA(model, rule=rule, update_every=every, target="copy")
    reference = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 37):  # 36 steps: a multiple of every interval tried
        if (t - 1) % every == 0:  # the model changes once per update interval
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        m = rule.decay_at(t)
        reference = [m * e + (1 - m) * p.detach() for e, p in zip(reference, model.parameters(), strict=True)]
        ema.update()
    for got, want in zip(ema.target.parameters(), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_schedules_save_and_rebuild():
    for rule in SCHEDULES[:2]:
        assert rules.rule_from_config(rule.config()) == rule
    model = nn.Linear(2, 2)
    ema = polyak.EMA(model, rule=CosineMomentum(total_steps=10))
    other = polyak.EMA(model, rule=CosineMomentum(total_steps=20))
    with pytest.raises(ValueError, match="rule"):
        other.load_state_dict(ema.state_dict())
